"""Forward+backward time and peak memory of the scored ops, next to SDPA softmax.

Each (op, backend, L) runs in a fresh subprocess so that its peak resident memory can be read
from the OS (``ru_maxrss``) without the other runs' allocations. Results are written to
``benchmarks/results/scored_ops-<machine>.json`` and ``.md`` with the command and the machine.

    python benchmarks/bench_scored_ops.py                       # L = 1k .. 16k
    python benchmarks/bench_scored_ops.py --lengths 1024 2048   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = [  # (label, op, backend, kwargs)
    ("softmax/sdpa", "softmax_attention", "sdpa", {}),
    ("sigmoid/tiled", "sigmoid_attention", "tiled", {}),
    ("lssa/tiled", "softplus_attention", "tiled", {"reweight_p": None}),
    ("lssar/tiled", "softplus_attention", "tiled", {"reweight_p": 15.0}),
    ("sigmoid/reference", "sigmoid_attention", "reference", {}),
    ("softmax/reference", "softmax_attention", "reference", {}),
]
REFERENCE_MAX_L = 4096  # the dense reference holds B*H*L^2 scores several times over


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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

    base = _rss_mb()
    step()  # warm-up, and the peak-memory measurement
    peak = _rss_mb() - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    tokens = args.batch * args.length
    best = min(times)
    print(json.dumps({"case": label, "length": args.length, "seconds": best,
                      "tokens_per_s": tokens / best, "peak_mb": peak}))


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    num = sum((a - mx) * (b - my) for a, b in pts)
    den = sum((a - mx) ** 2 for a, _ in pts)
    return num / den


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cases", nargs="+", default=[c[0] for c in CASES])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return worker(args)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    rows = []
    for length in args.lengths:
        for label in args.cases:
            if label.endswith("/reference") and length > REFERENCE_MAX_L:
                continue
            cmd = [sys.executable, __file__, "--case", label, "--length", str(length),
                   "--batch", str(args.batch), "--heads", str(args.heads),
                   "--head-dim", str(args.head_dim), "--repeats", str(args.repeats),
                   "--causal" if args.causal else "--no-causal"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                row = {"case": label, "length": length, "error": res.stderr.strip()[-300:]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)

    report = {"command": command, "machine": machine(),
              "config": {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "causal",
                                                       "repeats")},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scored_ops-{report['machine']['host']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


def markdown(report: dict) -> str:
    rows = [r for r in report["rows"] if "error" not in r]
    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(r["case"] for r in report["rows"]))
    get = {(r["case"], r["length"]): r for r in rows}
    m, c = report["machine"], report["config"]
    out = [
        "# Scored ops: forward + backward, time and peak memory", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}, {m['platform']}.", "",
        f"Config: batch {c['batch']}, {c['heads']} heads, head dim {c['head_dim']}, "
        f"causal={c['causal']}, best of {c['repeats']} after one warm-up.", "",
        "## Throughput (tokens/s, forward+backward) and ratio to SDPA softmax", "",
        "| case | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for label in labels:
        cells = []
        for n in lengths:
            r, base = get.get((label, n)), get.get(("softmax/sdpa", n))
            if r is None:
                cells.append("–")
            else:
                ratio = f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base else ""
                cells.append(f"{r['tokens_per_s']:.0f}{ratio}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "## Peak extra memory (MB) and its fitted growth exponent in L", "",
            "| case | " + " | ".join(f"L={n}" for n in lengths) + " | exponent |",
            "|---|" + "---|" * (len(lengths) + 1)]
    for label in labels:
        pts = [(n, get[(label, n)]["peak_mb"]) for n in lengths if (label, n) in get]
        cells = [f"{get[(label, n)]['peak_mb']:.0f}" if (label, n) in get else "–"
                 for n in lengths]
        exp = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
        out.append(f"| {label} | " + " | ".join(cells) +
                   f" | {'–' if exp is None else f'{exp:.2f}'} |")
    errors = [r for r in report["rows"] if "error" in r]
    if errors:
        out += ["", "## Failed runs", ""] + [f"- {r['case']} L={r['length']}: {r['error']}"
                                             for r in errors]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
