"""Time and peak memory against L of the local and sparse mechanisms, next to SDPA.

Two groups, each with its own baseline:

- ops, (B, H, L, D) = (1, 8, L, 64): ``neighborhood_attention`` (tiled backend, 1-D,
  K = 32 / 128 / 512) against the same neighborhoods as a dense boolean mask through SDPA
  ("dense masked attention", K = 128), and plain SDPA softmax;
- modules, ``attnlab.build(name, dim=512, heads=8)``: maxvit (window 7, grid 7, on the
  1 x L grid) and dma (w = 256, causal) against the softmax module in the same mode.

``--mode forward`` times inference (no grad); ``--mode train`` forward + backward. Each
(case, L) runs in a fresh subprocess. Writes
``benchmarks/results/local_<mode>-<machine>.{json,md}``.

    python benchmarks/bench_local.py --mode forward --lengths 1024 4096 16384
    python benchmarks/bench_local.py --mode train --lengths 1024 4096
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

# label -> (kind, argument, longest L it runs at)
CASES = {
    "sdpa": ("op", None, 16384),
    "sdpa-masked-k128": ("op", 128, 16384),
    "neighborhood-k32": ("op", 32, 16384),
    "neighborhood-k128": ("op", 128, 16384),
    "neighborhood-k512": ("op", 512, 16384),
    "softmax-bidir": ("module", ("softmax", False), 16384),
    "maxvit": ("module", ("maxvit", False), 16384),
    "softmax-causal": ("module", ("softmax", True), 16384),
    "dma-w256": ("module", ("dma", True), 4096),
}
BASELINES = {"sdpa": "sdpa", "sdpa-masked-k128": "sdpa-masked-k128",
             "neighborhood-k32": "sdpa-masked-k128", "neighborhood-k128": "sdpa-masked-k128",
             "neighborhood-k512": "sdpa-masked-k128", "softmax-bidir": "softmax-bidir",
             "maxvit": "softmax-bidir", "softmax-causal": "softmax-causal",
             "dma-w256": "softmax-causal"}


def op_step(label: str, length: int, train: bool):
    import torch
    import torch.nn.functional as F

    from attnlab.ops import neighborhood_attention, neighborhood_visibility

    q, k, v = (torch.randn(1, 8, length, 64, requires_grad=train) for _ in range(3))
    kernel = CASES[label][1]
    mask = None
    if label == "sdpa-masked-k128":
        mask = neighborhood_visibility((length,), kernel_size=kernel)

    def run():
        if label.startswith("neighborhood"):
            return neighborhood_attention(q, k, v, kernel_size=kernel)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run, (q, k, v)


def module_step(label: str, length: int, train: bool):
    import torch

    import attnlab as al

    name, causal = CASES[label][1]
    kwargs = {"window": 256} if name == "dma" else {}
    attn = al.build(name, dim=512, heads=8, causal=causal, **kwargs)
    x = torch.randn(1, length, 512, requires_grad=train)
    return (lambda: attn(x)), (x, *attn.parameters())


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    train = args.mode == "train"
    make = op_step if CASES[args.case][0] == "op" else module_step
    run, leaves = make(args.case, args.length, train)

    def step():
        if train:
            run().sum().backward()
            for t in leaves:
                t.grad = None
        else:
            with torch.no_grad():
                run()

    peak, best = measure(step, args.repeats)
    print(json.dumps({"case": args.case, "length": args.length, "seconds": best,
                      "tokens_per_s": args.length / best, "peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_arguments(p, repeats=2)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--mode", choices=("forward", "train"), default="forward")
    args = p.parse_args()
    if args.case:
        return worker(args)

    def worker_args(label: str, length: int) -> list[str] | str:
        if length > CASES[label][2]:
            return f"dense (L, L) selection; run up to L={CASES[label][2]}"
        return ["--case", label, "--length", str(length), "--mode", args.mode,
                "--repeats", str(args.repeats)]

    command = command_line()
    rows = sweep(__file__, args.lengths, args.cases, worker_args)
    notes = ("neighborhood-k* are compared with the same K = 128 neighborhoods run as a dense "
             "masked SDPA (the ideal speed-up of a K-window over dense masked attention is "
             "L / K); maxvit with the softmax module (bidirectional), dma with the causal "
             "softmax module. Target: neighborhood at L = 16384 reaching at least half of "
             "L / K over dense masked attention.")
    path = write_report(f"local_{args.mode}", f"Local and sparse mechanisms: {args.mode}",
                        command, {"ops": "B=1, H=8, D=64", "modules": "dim=512, heads=8",
                                  "mode": args.mode,
                                  "repeats": f"best of {args.repeats} after a warm-up"},
                        rows, baseline=BASELINES, notes=notes, out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
