"""Causal linear attention, forward + backward, per form at short lengths (issue 35).

Why ``linear_attention(backend="auto")`` takes the parallel form when the keys fit in one
chunk: there the chunked form computes the same (C x C) product plus the padding, prefix
sums and state of a chunk loop. Times the median of ``--repeats`` forward + backward passes
of ``out.sum()`` for each form (one torch thread, float32, batch 64, 2 heads, head dim 32: the
default arena comparison's attention) and writes the table, with the command and the machine,
to ``benchmarks/results/linear-one-chunk-cpu.md``.

    python benchmarks/linear_one_chunk.py
    python benchmarks/linear_one_chunk.py --lengths 32 64 128 256 --repeats 30
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from attnlab.machine import describe, machine
from attnlab.ops.linear import linear_attention

RESULTS = Path(__file__).with_name("results") / "linear-one-chunk-cpu.md"
FORMS = ("chunked", "parallel", "auto")


def median_ms(length: int, form: str, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, 2, length, 32, generator=g).requires_grad_() for _ in range(3))
    times = []
    for i in range(repeats + 3):  # three warm-up passes
        start = time.perf_counter()
        linear_attention(q, k, v, causal=True, backend=form).sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = ["| L | " + " | ".join(f"{f} (ms)" for f in FORMS) + " | chunked / parallel |",
            "|---:|" + "---:|" * (len(FORMS) + 1)]
    for length in args.lengths:
        ms = {f: median_ms(length, f, args.repeats) for f in FORMS}
        rows.append(f"| {length} | " + " | ".join(f"{ms[f]:.2f}" for f in FORMS) +
                    f" | {ms['chunked'] / ms['parallel']:.2f} |")
        print(rows[-1], flush=True)
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    text = "\n".join([
        "# Causal linear attention at short lengths: forward + backward per form", "",
        f"command: `{command}`  ",
        f"machine: {describe(machine())}, 1 torch thread  ",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
        "Batch 64, 2 heads, head dim 32, float32, elu + 1 features, chunk_size 64 (the "
        "default); median of the timed passes. `auto` takes `parallel` when L <= chunk_size "
        "and `chunked` above, so above 64 the `auto` and `chunked` columns time the same "
        "code: their gap is this machine's noise.", "", *rows, ""])
    RESULTS.write_text(text)
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
