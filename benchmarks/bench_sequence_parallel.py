"""Sequence-parallel attention: time and peak memory per rank against the number of ranks.

Each (kind, ranks) runs in fresh processes (``torch.multiprocessing.spawn``, gloo, one thread
per rank): every rank holds L / ranks positions of one sequence (B = 1) and runs forward +
backward of ``attnlab.distributed.sequence_parallel_attention`` on its piece. Reported per
configuration: the largest peak RSS increase over the ranks during the first step (MB) and
the median over ``--repeats`` steps of the slowest rank's time. On a machine with fewer cores
than ranks the ranks share cores, so the times measure contention as much as the algorithm;
the memory per rank is the number this benchmark is for.
Writes ``benchmarks/results/sequence_parallel-<machine>.{json,md}``.

    python benchmarks/bench_sequence_parallel.py
    python benchmarks/bench_sequence_parallel.py --length 2048 --ranks 1 2 --kinds softmax
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import RESULTS, command_line, machine, rss_mb  # noqa: E402

from attnlab.tables import markdown_table  # noqa: E402

KINDS = ("softmax", "sigmoid", "softplus", "linear")


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    from attnlab.distributed import sequence_parallel_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    piece = args.length // world
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, args.heads, piece, args.head_dim, generator=g,
                           requires_grad=True) for _ in range(3))

    def step() -> None:
        out = sequence_parallel_attention(q, k, v, kind=args.kind, causal=args.causal)
        out.sum().backward()

    dist.barrier()
    base = rss_mb()
    step()
    peak = rss_mb() - base
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_mb": peak, "times": times}))
    dist.destroy_process_group()


def run(kind: str, world: int, args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    folder = tempfile.mkdtemp()
    case = argparse.Namespace(**{**vars(args), "kind": kind})
    mp.spawn(worker, args=(world, os.path.join(folder, "init"), case, folder), nprocs=world)
    ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    step_times = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
    return {"kind": kind, "ranks": world, "peak_mb_per_rank": max(r["peak_mb"] for r in ranks),
            "seconds": statistics.median(step_times), "seconds_all": step_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for kind in args.kinds:
        for world in args.ranks:
            row = run(kind, world, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = machine()
    report = {"command": command_line(), "machine": info, "rows": rows,
              "config": {"length": args.length, "heads": args.heads, "head_dim": args.head_dim,
                         "batch": 1, "causal": args.causal, "repeats": args.repeats,
                         "backend": "gloo", "threads_per_rank": 1}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sequence_parallel-{info['host']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    first = {r["kind"]: r for r in rows if r["ranks"] == min(args.ranks)}
    table = [[r["kind"], r["ranks"], f"{r['peak_mb_per_rank']:.0f}",
              f"{first[r['kind']]['peak_mb_per_rank'] / max(r['peak_mb_per_rank'], 1e-9):.1f}x",
              f"{r['seconds']:.3f}"] for r in rows]
    text = ["# Sequence-parallel attention: memory and time per rank against ranks", "",
            f"Command: `{report['command']}`", "",
            f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python "
            f"{info['python']}, {info['platform']}.", "",
            "Config: " + ", ".join(f"{k} {v}" for k, v in report["config"].items()) + ".", "",
            "Forward + backward of each rank's piece (L / ranks positions). Peak: the largest "
            "RSS increase of any rank during the first step; time: median of the slowest "
            "rank's step (ranks share the machine's cores).", "",
            markdown_table(["kind", "ranks", "peak MB per rank",
                            f"memory saved vs {min(args.ranks)} rank", "seconds per step"],
                           table)]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
