"""A minimal hand-written sigmoid-attention LM on MQAR, independent of attnlab's models.

Question (issue 35, docs/results/sigmoid_mqar.md): is the dependence of sigmoid attention
on its bias b a property of sigmoid attention, or of attnlab's implementation? This file
writes its own model with plain torch ops: token embedding, 2 pre-norm blocks (LayerNorm,
multi-head attention with RoPE, GELU MLP), final LayerNorm and a linear head. Only the
MQAR batches and the evaluation come from attnlab (``attnlab.tasks``), so the accuracy is
scored on exactly the episodes the arena scores.

    attention: softmax(c q.k + causal mask) or sigmoid(c q.k + b), masked weights 0.
    training:  AdamW (no weight decay), linear warm-up 5% then cosine to 0, clip 1.0.
    init:      PyTorch's default Linear init; embeddings N(0, s^2), s = --embed-std (0.1 as
               TransformerLM; 0.02, GPT-2's, stalls softmax's recall, docs/results/recipe.md).

    python benchmarks/sigmoid_minimal_mqar.py                    # the default grid, 2 procs
    python benchmarks/sigmoid_minimal_mqar.py --lrs 0.001 --embed-std 0.02
    python benchmarks/sigmoid_minimal_mqar.py --biases -3.4657 --seeds 0 --lrs 0.001
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.tasks import make_task, split_generator

TASK = {"vocab": 32, "seq_len": 32, "train_kv": [2, 4], "eval_kv": [2, 4]}


def rope(x: Tensor) -> Tensor:
    """Rotary position embedding (rotate-half form) on (B, H, L, D)."""
    d, length = x.shape[-1], x.shape[-2]
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = torch.arange(length, dtype=torch.float32)[:, None] * freq[None]  # (L, D/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kind: str, bias: float) -> None:
        super().__init__()
        self.heads, self.kind, self.bias = heads, kind, bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        if self.kind == "softmax":
            w = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        else:  # sigmoid(c q.k + b), no normalisation over the row; masked weights 0
            w = torch.sigmoid(scores + self.bias).masked_fill(~causal, 0.0)
        return self.out((w @ v).transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kind: str, bias: float) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kind, bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class LM(nn.Module):
    def __init__(self, vocab: int, dim: int, depth: int, heads: int, kind: str,
                 bias: float, embed_std: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.blocks = nn.ModuleList(Block(dim, heads, kind, bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.05) -> float:
    warm = max(1, int(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def run(kind: str, bias: float, lr: float, seed: int, steps: int, embed_std: float) -> dict:
    torch.set_num_threads(1)
    task = make_task("mqar", **TASK)
    torch.manual_seed(seed)
    model = LM(task.vocab_size(), 64, 2, 2, kind, bias, embed_std)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = split_generator(seed, "train")  # the arena's training stream of this seed
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        inputs, targets = task.sample(64, generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    result = task.evaluate(model, "test")  # the arena's fixed test episodes
    return {"kind": kind, "bias": bias, "lr": lr, "seed": seed, "embed_std": embed_std,
            "accuracy": round(result.metrics["accuracy"], 4),
            "slices": {k: round(v, 4) for k, v in result.slices.items()},
            "final_loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--biases", type=float, nargs="*",
                    default=[-math.log(32), -math.log(4), 0.0], help="sigmoid b values")
    ap.add_argument("--no-softmax", action="store_true")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--embed-std", type=float, default=0.1,
                    help="token embedding init N(0, s^2); 0.1 is TransformerLM's default")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    configs = ([] if args.no_softmax else [("softmax", 0.0)]) + \
        [("sigmoid", b) for b in args.biases]
    jobs = [(kind, b, lr, seed, args.steps, args.embed_std) for kind, b in configs
            for lr in args.lrs for seed in args.seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs, strict=True)))
    for r in results:
        print(json.dumps(r))
    print(f"\n{'attention':<22} {'lr':>7}  accuracy per seed            mean")
    for kind, b in configs:
        name = "softmax" if kind == "softmax" else f"sigmoid b={b:+.3f}"
        for lr in args.lrs:
            accs = [r["accuracy"] for r in results
                    if (r["kind"], r["bias"], r["lr"]) == (kind, b, lr)]
            print(f"{name:<22} {lr:>7g}  {' '.join(f'{a:.3f}' for a in accs):<28} "
                  f"{statistics.mean(accs):.3f}")
    print(f"\nembeddings N(0, {args.embed_std}^2); {len(jobs)} runs, {args.workers} processes, "
          f"{time.perf_counter() - start:.0f} s, torch {torch.__version__}")


if __name__ == "__main__":
    main()
