"""Train a tiny TransformerLM on the arena's induction task (CPU), save its weights."""
import time
import torch
from attnlab.models import TransformerLM
from attnlab.tasks import make_task

torch.set_num_threads(1)
task = make_task("induction", vocab=24, length=32, segment=6)
torch.manual_seed(0)
model = TransformerLM(vocab=24, dim=32, depth=2, heads=4)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(1, 1501):
    x, y = task.sample(32, g)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        with torch.no_grad():
            x, y = task.sample(256, torch.Generator().manual_seed(99))
            pred = model(x).argmax(-1); keep = y != -100
            acc = (pred[keep] == y[keep]).float().mean().item()
        print(f"step {step} loss {loss.item():.3f} acc {acc:.3f} {time.time()-t0:.0f}s", flush=True)
        torch.save(model.state_dict(), "induction.pt")
        if acc > 0.99:
            break
