"""Does the char-LM evaluation on CUDA agree with the CPU for the same trained weights?

Trains one run of docs/results/hedgehog.toml's softmax contestant (seed 0) on the
available device, then evaluates the same weights on that device and on the CPU.
``STEPS=2 python benchmarks/diagnostics/char_lm_cuda_eval.py`` is a quick smoke run.

Seen on an H200 (torch 2.11.0+cu130, 2026-11-25): last training loss 1.459; test loss
2.039 on CUDA (token_losses) and 2.159 (evaluate), 1.579 on the CPU. Cause: the evaluation
wrapper's device-to-host copies were non_blocking and read before they landed. After the fix
(same day, same machine): 1.5789 on CUDA and on the CPU, token_losses and evaluate alike.
"""

import os

import torch

from attnlab.arena.trainer import OnDevice, learning_rate, make_optimizer
from attnlab.tasks import char_lm as corpus
from attnlab.tasks import make_task
from attnlab.tasks.base import split_generator

STEPS = int(os.environ.get("STEPS", 600))


def main() -> None:
    task = make_task("char_lm", length=128)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = task.build_model("softmax", {}, dim=64, depth=2, heads=4).to(dev)
    opt = make_optimizer(model, 3e-3, 0.01)
    g = split_generator(0, "train")
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, STEPS, 3e-3, 0.05)
        batch = tuple(t.to(dev) for t in task.train_batch(32, g))
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    print("last training loss", loss.item())
    model.eval()
    with torch.no_grad():
        for where in (dev.type, "cpu"):
            wrapped = OnDevice(model.to(where), torch.device(where), "float32")
            losses = task.token_losses(wrapped, 128, "test")
            print(where, "test loss", losses.mean().item(),
                  "worst windows", losses.mean(1).topk(3).values.tolist())
        for where in (dev.type, "cpu"):
            wrapped = OnDevice(model.to(where), torch.device(where), "float32")
            print("evaluate() on", where, task.evaluate(wrapped, "test").metrics["loss"])
    print("test characters", len(corpus.split_corpus("test")))


if __name__ == "__main__":
    main()
