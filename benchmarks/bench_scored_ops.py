"""Forward+backward time and peak memory of the scored ops, next to SDPA softmax.

Each (op, backend, L) runs in a fresh subprocess so that its peak resident memory can be read
from the OS (``ru_maxrss``) without the other runs' allocations. Results are written to
``benchmarks/results/scored_ops-<machine>.json`` and ``.md`` with the command and the machine
(the harness is ``benchmarks/harness.py``).

    python benchmarks/bench_scored_ops.py                       # L = 1k .. 16k
    python benchmarks/bench_scored_ops.py --lengths 1024 2048   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import (  # noqa: E402
    add_common_arguments,
    command_line,
    measure,
    sweep,
    write_report,
)

CASES = [  # (label, op, backend, kwargs)
    ("softmax/sdpa", "softmax_attention", "sdpa", {}),
    ("sigmoid/tiled", "sigmoid_attention", "tiled", {}),
    ("lssa/tiled", "softplus_attention", "tiled", {"reweight_p": None}),
    ("lssar/tiled", "softplus_attention", "tiled", {"reweight_p": 15.0}),
    ("sigmoid/reference", "sigmoid_attention", "reference", {}),
    ("softmax/reference", "softmax_attention", "reference", {}),
]
REFERENCE_MAX_L = 4096  # the dense reference holds B*H*L^2 scores several times over


def worker(args: argparse.Namespace) -> None:
    import torch

    import attnlab.ops as ops

    label, op_name, backend, kwargs = next(c for c in CASES if c[0] == args.case)
    op = getattr(ops, op_name)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(*shape, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(*shape, generator=g)

    def step():
        out = op(q, k, v, causal=args.causal, backend=backend, **kwargs)
        out.backward(grad)
        for t in (q, k, v):
            t.grad = None

    peak, best = measure(step, args.repeats)
    print(json.dumps({"case": label, "length": args.length, "seconds": best,
                      "tokens_per_s": args.batch * args.length / best, "peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_arguments(p, repeats=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cases", nargs="+", default=[c[0] for c in CASES])
    args = p.parse_args()
    if args.case:
        return worker(args)

    def worker_args(label: str, length: int) -> list[str] | str:
        if label.endswith("/reference") and length > REFERENCE_MAX_L:
            return f"the dense reference holds B*H*L^2 scores; run up to L={REFERENCE_MAX_L}"
        return ["--case", label, "--length", str(length), "--batch", str(args.batch),
                "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                "--repeats", str(args.repeats), "--causal" if args.causal else "--no-causal"]

    command = command_line()
    rows = sweep(__file__, args.lengths, args.cases, worker_args)
    config = {"batch": args.batch, "heads": args.heads, "head dim": args.head_dim,
              "causal": args.causal, "repeats": f"best of {args.repeats} after a warm-up"}
    path = write_report("scored_ops", "Scored ops: forward + backward, time and peak memory",
                        command, config, rows, baseline="softmax/sdpa", out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
