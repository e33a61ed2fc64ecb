"""Peak resident memory of one training step of sparsifiner, dma and longheads (issue 35).

Each case runs in a fresh process: build the module (dim 256, 4 heads, causal, float32,
training mode), one forward and backward of ``out.sum() + extra_loss()`` on random input of
batch 1, and report ``ru_maxrss`` (the process's peak RSS) before and after the step. Cases
run one after the other, never in parallel. The table goes to stdout and, with the command,
the machine and the torch version, to ``benchmarks/results/sparsifiner-memory-cpu.md``.

    python benchmarks/sparsifiner_memory.py                       # L = 8192
    python benchmarks/sparsifiner_memory.py --lengths 4096 8192 16384 --allocators default peak
    python benchmarks/sparsifiner_memory.py --baseline-src /tmp/attnlab-head/src
    python benchmarks/sparsifiner_memory.py --lengths 16384 --append   # one more table

``--allocators``: ``default`` is glibc as a training process gets it (what the issue
measures); ``peak`` sets glibc's mmap threshold to 64 KiB, as ``attnlab bench`` does for its
memory phase, so that freed blocks leave the resident set and the peak is close to the live
bytes: the difference between the two is memory the allocator kept. ``--baseline-src``: the
``src`` folder of another attnlab checkout (e.g. ``git archive HEAD src | tar -x -C DIR``),
run the same way for a before/after comparison on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

MECHANISMS = ("sparsifiner", "dma", "longheads")
# the predictor whose memory issue 35 bounded (the official basis predictor of issue 40 holds
# a (tokens, tokens / 6) basis and needs tokens >= L)
SETTINGS = {"sparsifiner": {"predictor": "lowrank", "distill_weight": 1.0}}
DIM, HEADS = 256, 4
RESULTS = Path(__file__).with_name("results") / "sparsifiner-memory-cpu.md"
MIB = 1024  # ru_maxrss is in KiB on Linux


def child(name: str, length: int, threads: int | None) -> dict:
    """One training step in this process; peak RSS before and after it, in MiB."""
    import torch

    import attnlab as al

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    attn = al.build(name, dim=DIM, heads=HEADS, causal=True, **SETTINGS.get(name, {})).train()
    x = torch.randn(1, length, DIM, requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
    start = time.perf_counter()
    out = attn(x)
    (out.sum() + attn.extra_loss()).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB
    return {"before_mib": before, "peak_mib": peak, "seconds": seconds,
            "threads": torch.get_num_threads(), "attnlab": str(Path(al.__file__).parent)}


def allocator_env(allocator: str, src: str | None) -> dict[str, str]:
    """The child's environment: glibc's malloc variables of ``allocator`` only, and ``src``
    first on the Python path."""
    from attnlab.bench.measure import PEAK_ALLOCATOR, with_allocator

    env = with_allocator(dict(os.environ), PEAK_ALLOCATOR if allocator == "peak" else {})
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_case(name: str, length: int, allocator: str, src: str | None,
             threads: int | None) -> dict:
    """One case in a fresh process."""
    cmd = [sys.executable, __file__, "--child", name, str(length), str(threads or 0)]
    proc = subprocess.run(cmd, env=allocator_env(allocator, src), capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mechanism": name, "length": length, "allocator": allocator,
            "source": "baseline" if src else "this checkout", **result}


def cpu_model() -> str:
    """lscpu's model name (the /proc/cpuinfo one where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from attnlab.machine import machine

    return machine()["cpu"]


def table(rows: list[dict]) -> str:
    """Markdown table of the cases."""
    lines = ["| mechanism | L | source | allocator | peak RSS (MiB) | before the step (MiB) "
             "| step (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mechanism']} | {r['length']} | {r['source']} | {r['allocator']} "
                     f"| {r['peak_mib']:.0f} | {r['before_mib']:.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def report(rows: list[dict], command: str, baseline: str | None, label: str | None) -> str:
    """The results page."""
    import torch

    from attnlab.machine import source_commit

    threads = ", ".join(sorted({str(r["threads"]) for r in rows}))
    base = ""
    if baseline:
        base = f" Baseline: the attnlab source in `{baseline}`" + (f" ({label})." if label else ".")
    return "\n".join([
        "# Peak RSS of one training step: sparsifiner, dma, longheads (CPU)", "",
        f"Command: `{command}`", "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} torch threads; "
        f"torch {torch.__version__}; attnlab @ {source_commit()}.{base}", "",
        f"Setting: `attnlab.build(name, dim={DIM}, heads={HEADS}, causal=True)` (sparsifiner: "
        f"{SETTINGS['sparsifiner']}) in training "
        "mode, float32, batch 1, random input; one forward and backward of "
        "`out.sum() + extra_loss()`, each case in a fresh process, one case at a time. Peak "
        "RSS: `ru_maxrss` after the step (the process's peak, imports included); before the "
        "step: `ru_maxrss` after the imports, the build and the input. Allocator `default`: "
        "glibc as a training process gets it; `peak`: glibc's mmap threshold at 64 KiB "
        "(`attnlab bench`'s memory phase), so that freed blocks leave the resident set. "
        "Step times are one run each on a shared machine: indicative only.", "",
        table(rows), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, metavar=("NAME", "LENGTH", "THREADS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help="torch threads per case (default: torch's)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS))
    ap.add_argument("--allocators", nargs="+", choices=("default", "peak"),
                    default=["default"])
    ap.add_argument("--baseline-src", help="src folder of another attnlab checkout to compare")
    ap.add_argument("--baseline-label", help="what the baseline is, for the results page "
                    "(e.g. 'commit 5a44fef')")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results page ('-': none)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's command and table to the results page")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    sources = [None, args.baseline_src] if args.baseline_src else [None]
    rows = []
    for length in args.lengths:
        for name in args.mechanisms:
            for src in sources:
                for allocator in args.allocators:
                    rows.append(run_case(name, length, allocator, src, args.threads))
                    r = rows[-1]
                    print(f"{name} L={length} {r['source']} {allocator}: peak "
                          f"{r['peak_mib']:.0f} MiB ({r['seconds']:.1f} s)", flush=True)
    print(table(rows))
    if str(args.out) != "-":
        command = shlex.join(["python", "benchmarks/sparsifiner_memory.py", *sys.argv[1:]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and args.out.exists():
            more = f"\nAnd: `{command}`\n\n{table(rows)}\n"
            args.out.write_text(args.out.read_text() + more)
        else:
            args.out.write_text(report(rows, command, args.baseline_src, args.baseline_label))
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
