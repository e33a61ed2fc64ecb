"""Forward+backward time and peak memory of the linear / kernelised mechanisms against SDPA.

Whole modules (``attnlab.build(name, dim=512, heads=8)``, head dim 64, batch 1), each in its
usual mode (causal where the paper is a language model, bidirectional for the vision ones),
next to softmax (SDPA) in both modes. Each (mechanism, L) runs in a fresh subprocess.
Writes ``benchmarks/results/linear_family-<machine>.{json,md}``.

    python benchmarks/bench_linear_family.py
    python benchmarks/bench_linear_family.py --lengths 1024 2048 --cases linear mala
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

# label -> (mechanism, causal, longest L it is run at: the quadratic ones stop early)
CASES = {
    "softmax-causal": ("softmax", True, 16384),
    "softmax-bidir": ("softmax", False, 16384),
    "linear": ("linear", True, 16384),
    "mala": ("mala", False, 16384),
    "inline": ("inline", False, 16384),
    "hedgehog": ("hedgehog", True, 16384),
    "agent": ("agent", False, 16384),
    "soft": ("soft", False, 16384),
    "l2vit": ("l2vit", False, 16384),
    "rfa": ("rfa", True, 8192),
    "lla": ("lla", True, 2048),
}
LINEAR = ("linear", "mala", "inline", "hedgehog", "agent", "soft", "l2vit")


def worker(args: argparse.Namespace) -> None:
    import torch

    import attnlab as al

    name, causal, _ = CASES[args.case]
    torch.manual_seed(0)
    attn = al.build(name, dim=args.dim, heads=args.heads, causal=causal)
    x = torch.randn(args.batch, args.length, args.dim, requires_grad=True)

    def step():
        attn(x).sum().backward()
        x.grad = None
        attn.zero_grad(set_to_none=True)

    peak, best = measure(step, args.repeats)
    print(json.dumps({"case": args.case, "length": args.length, "seconds": best,
                      "tokens_per_s": args.batch * args.length / best, "peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_arguments(p, repeats=2)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    if args.case:
        return worker(args)

    def worker_args(label: str, length: int) -> list[str] | str:
        if length > CASES[label][2]:
            return f"quadratic in L; run up to L={CASES[label][2]}"
        return ["--case", label, "--length", str(length), "--dim", str(args.dim),
                "--heads", str(args.heads), "--batch", str(args.batch),
                "--repeats", str(args.repeats)]

    command = command_line()
    rows = sweep(__file__, args.lengths, args.cases, worker_args)
    baselines = {label: "softmax-causal" if causal else "softmax-bidir"
                 for label, (_, causal, _) in CASES.items()}
    notes = ("Ratios are against softmax (SDPA) in the same mode: causal mechanisms against "
             "softmax-causal, bidirectional ones against softmax-bidir. Linear-time targets: "
             "time exponent <= 1.1 and faster than SDPA softmax from L = 2048 for "
             f"{', '.join(LINEAR)}; lla and rfa are quadratic by definition.")
    path = write_report("linear_family", "Linear and kernelised mechanisms: forward + backward",
                        command, {"dim": args.dim, "heads": args.heads, "batch": args.batch,
                                  "repeats": f"best of {args.repeats} after a warm-up"},
                        rows, baseline=baselines, notes=notes, out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
