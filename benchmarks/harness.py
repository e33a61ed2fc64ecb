"""Shared benchmark harness: one subprocess per case (clean peak memory), machine info,
scaling-exponent fits and the Markdown report. Used by the bench_*.py scripts."""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from attnlab.machine import machine  # noqa: F401  (re-exported to the bench scripts)
from attnlab.tables import markdown_table

RESULTS = Path(__file__).parent / "results"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Peak extra memory (MB) of the first (warm-up) step and the best time of ``repeats``."""
    base = rss_mb()
    step()
    peak = rss_mb() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return peak, min(times)


def run_case(script: str, args: list[str]) -> dict:
    """Run ``script --worker-args`` in a fresh interpreter; its last stdout line is JSON."""
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-300:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def add_common_arguments(parser, repeats: int) -> None:
    """The arguments every bench script takes (and the hidden ones of its worker)."""
    import argparse

    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results folder (default: benchmarks/results)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)


def sweep(script: str, lengths: list[int], cases: list[str],
          worker_args: Callable[[str, int], list[str] | str]) -> list[dict]:
    """Run every (case, length) in its own process; ``worker_args`` returns the worker's
    arguments, or a string saying why that case is not run at that length."""
    rows = []
    for length in lengths:
        for label in cases:
            args = worker_args(label, length)
            row = {"case": label, "length": length}
            row.update({"skipped": args} if isinstance(args, str) else run_case(script, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    num = sum((a - mx) * (b - my) for a, b in pts)
    den = sum((a - mx) ** 2 for a, _ in pts)
    return num / den


def write_report(name: str, title: str, command: str, config: dict, rows: list[dict],
                 baseline: str | dict[str, str], notes: str = "", out: Path = RESULTS) -> Path:
    """Write <out>/<name>-<host>.json and .md; returns the Markdown path.

    ``baseline``: the case every ratio is taken against, or a mapping case -> its baseline.
    """
    report = {"command": command, "machine": machine(), "config": config, "rows": rows,
              "title": title, "baseline": baseline, "notes": notes}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{report['machine']['host']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    return stem.with_suffix(".md")


def markdown(report: dict) -> str:
    title, baseline, notes = report["title"], report["baseline"], report.get("notes", "")
    rows = [r for r in report["rows"] if "error" not in r and "skipped" not in r]
    lengths = sorted({r["length"] for r in report["rows"]})
    labels = list(dict.fromkeys(r["case"] for r in report["rows"]))
    get = {(r["case"], r["length"]): r for r in rows}
    m = report["machine"]
    out = [f"# {title}", "", f"Command: `{report['command']}`", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
           f"({m['torch_threads']} threads), Python {m['python']}, {m['platform']}.", "",
           "Config: " + ", ".join(f"{k} {v}" for k, v in report["config"].items()) + ".", ""]
    if notes:
        out += [notes, ""]
    base_of = (lambda case: baseline.get(case, case)) if isinstance(baseline, dict) \
        else (lambda case: baseline)
    against = ("its baseline (" + ", ".join(sorted(set(baseline.values()))) + ")"
               if isinstance(baseline, dict) else baseline)
    timed = "forward" if report["config"].get("mode") == "forward" else "forward+backward"
    columns = [f"L={n}" for n in lengths]
    speed_rows = []
    for label in labels:
        cells = []
        for n in lengths:
            r, base = get.get((label, n)), get.get((base_of(label), n))
            if r is None:
                cells.append("–")
                continue
            ratio = f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base else ""
            cells.append(f"{r['tokens_per_s']:.0f}{ratio}")
        pts = [(n, get[(label, n)]["seconds"]) for n in lengths if (label, n) in get]
        exp = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
        speed_rows.append([label, *cells, "–" if exp is None else f"{exp:.2f}"])
    out += [f"## Throughput (tokens/s, {timed}) and ratio to " + against, "",
            markdown_table(["case", *columns, "time exponent"], speed_rows)]
    memory_rows = []
    for label in labels:
        pts = [(n, get[(label, n)]["peak_mb"]) for n in lengths if (label, n) in get]
        cells = [f"{get[(label, n)]['peak_mb']:.0f}" if (label, n) in get else "–"
                 for n in lengths]
        exp = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
        memory_rows.append([label, *cells, "–" if exp is None else f"{exp:.2f}"])
    out += ["", "## Peak extra memory (MB) and its fitted growth exponent in L", "",
            markdown_table(["case", *columns, "exponent"], memory_rows)]
    other = [r for r in report["rows"] if "error" in r or "skipped" in r]
    if other:
        out += ["", "## Not run", ""] + [
            f"- {r['case']} L={r['length']}: {r.get('skipped') or r.get('error')}" for r in other]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    # Rebuild the Markdown of recorded results: python benchmarks/harness.py results/X.json
    for path in map(Path, sys.argv[1:]):
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
