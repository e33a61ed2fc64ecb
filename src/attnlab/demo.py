"""A seconds-long demo: train tiny language models that differ only in their attention.

The task is induction copying: a random token sequence is shown twice, and the model must
predict the second copy, which it can only do by attending back to the first. The arena
(a later issue) replaces this with fair multi-seed comparisons.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnlab.models.transformer_lm import TransformerLM


@dataclass
class DemoResult:
    mechanism: str
    params: int
    steps: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float


def copy_batch(batch: int, half: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(0, vocab, (batch, half), generator=generator)
    return torch.cat([first, first], dim=1)


def _loss(model: TransformerLM, tokens: torch.Tensor, half: int) -> tuple[torch.Tensor, float]:
    logits = model(tokens[:, :-1])[:, half - 1:]  # predictions of the second copy
    target = tokens[:, half:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    acc = (logits.argmax(-1) == target).float().mean().item()
    return loss, acc


def train_one(mechanism: str, *, steps: int = 150, seconds: float | None = None,
              vocab: int = 16, half: int = 16, batch: int = 32, dim: int = 64, seed: int = 0,
              on_step=None) -> DemoResult:
    """Train one tiny model on induction copying; ``seconds`` caps the wall time."""
    torch.manual_seed(seed)
    model = TransformerLM(vocab, dim=dim, depth=2, heads=4, mechanism=mechanism)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    train_gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = torch.tensor(math.nan)
    done = 0
    for step in range(steps):
        lr_scale = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = 3e-3 * lr_scale
        loss, _ = _loss(model, copy_batch(batch, half, vocab, train_gen), half)
        opt.zero_grad(set_to_none=True)
        (loss + model.extra_loss()).backward()
        opt.step()
        done = step + 1
        if on_step is not None:
            on_step(done, loss.item())
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        test = copy_batch(256, half, vocab, torch.Generator().manual_seed(10_000 + seed))
        test_loss, test_acc = _loss(model, test, half)
    return DemoResult(mechanism, sum(p.numel() for p in model.parameters()), done, loss.item(),
                      test_loss.item(), test_acc, elapsed)
