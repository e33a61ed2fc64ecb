"""Eager cost of the branch-free non-finite guard (issue 42), before vs after.

Before: ``hide_nonfinite`` tested ``if not bad.any()`` (a host sync, a graph break under
``torch.compile``) and returned k and v untouched when every key was finite. Branch-free:
it confines with ``torch.where`` whatever the keys hold (a copy of k and v, no branch): what
runs traced and on accelerators now. After (as shipped, eagerly on the CPU): the branch-free
path unless the keys are clean, where reading the flag costs no device sync. This script
times the three on clean inputs (the common case, where "before" skipped the copy):

- the guard alone, on the (B, H, Lk, D) keys and values of each shape;
- the guarded ops that use it: ``softmax_attention`` (prefill, and a decode step: one query
  over a long cache) and ``sigmoid_attention`` (the tiled CPU backend), with each guard;
- ``decode_attention``, whose eager clean path is a probe that skips the guard (unchanged).

Usage::

    python benchmarks/guard_overhead.py [--threads N] [--min-run-time S] [--out FILE]

Prints a Markdown table (median time per call, and the ratios to before).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.benchmark import Timer

import attnlab.ops.common as common
import attnlab.ops.neighborhood as neighborhood
from attnlab.ops.decode import decode_attention
from attnlab.ops.sigmoid import sigmoid_attention
from attnlab.ops.softmax import softmax_attention

AFTER = common.hide_nonfinite


def branch_free(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The guard's traced / accelerator path, forced on the CPU."""
    return common.confine_keys(k, v, ~torch.isfinite(k.sum(-1) + v.sum(-1)))


def guard_before(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The guard as it was before issue 42 (for the comparison only): no copy when every
    key is finite, decided on the host."""
    bad = ~torch.isfinite(k.sum(-1) + v.sum(-1))
    if not bad.any():
        return k, v, bad
    return k.masked_fill(bad.unsqueeze(-1), 0), v.masked_fill(bad.unsqueeze(-1), 0), bad


@contextlib.contextmanager
def guard(fn: Callable) -> Iterator[None]:
    """Run the guarded ops with ``fn`` as their guard."""
    saved = common.hide_nonfinite, neighborhood.hide_nonfinite
    common.hide_nonfinite = neighborhood.hide_nonfinite = fn
    try:
        yield
    finally:
        common.hide_nonfinite, neighborhood.hide_nonfinite = saved


def qkv(b: int, h: int, lq: int, lk: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g),
            torch.randn(b, h, lk, d, generator=g))


def median_us(stmt: Callable[[], object], min_run_time: float) -> float:
    stmt()  # warm up
    timer = Timer(stmt="stmt()", globals={"stmt": stmt})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


CASES: list[tuple[str, tuple[int, int, int, int, int], Callable | None]] = [
    ("guard alone, prefill", (2, 8, 512, 512, 64), None),
    ("guard alone, decode cache", (1, 8, 1, 4096, 64), None),
    ("softmax_attention prefill", (2, 8, 512, 512, 64),
     lambda q, k, v: softmax_attention(q, k, v, causal=True)),
    ("softmax_attention decode step", (1, 8, 1, 4096, 64),
     lambda q, k, v: softmax_attention(q, k, v, causal=True)),
    ("softmax_attention decode step, long", (1, 8, 1, 16384, 64),
     lambda q, k, v: softmax_attention(q, k, v, causal=True)),
    ("sigmoid_attention prefill (tiled)", (2, 8, 512, 512, 64),
     lambda q, k, v: sigmoid_attention(q, k, v, causal=True)),
    ("decode_attention step (probe, no guard)", (1, 8, 1, 4096, 64),
     lambda q, k, v: decode_attention(q, k, v)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of timing per case and guard (default 1)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{args.threads} threads, float32, clean inputs (no non-finite key)", "",
             "| case | (B, H, Lq, Lk, D) | before (us) | after, CPU eager (us) | "
             "branch-free (us) | after / before - 1 | branch-free / before - 1 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for label, shape, op in CASES:
        q, k, v = qkv(*shape)
        times = []
        for fn in (guard_before, AFTER, branch_free):
            if op is None:
                call = functools.partial(fn, k, v)
            else:
                call = functools.partial(op, q, k, v)
            with guard(fn):
                times.append(median_us(call, args.min_run_time))
        before, after, free = times
        line = (f"| {label} | {shape} | {before:.1f} | {after:.1f} | {free:.1f} | "
                f"{after / before - 1:+.0%} | {free / before - 1:+.0%} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
