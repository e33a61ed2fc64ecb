"""A bench report as Markdown (tables, targets, what was not run), log-log plots, and the
README's performance tables, all generated from the report's JSON."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from attnlab.bench.suites import GROUPS, TARGETS, Target
from attnlab.bench.workload import Workload
from attnlab.machine import describe
from attnlab.tables import markdown_table


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than 2 points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((a - mx) ** 2 for a, _ in pts)
    return sum((a - mx) * (b - my) for a, b in pts) / den if den else None


def sections(report: dict) -> dict[tuple[str, str, str], list[dict]]:
    """Rows by (group, mode, dtype), in the order they were measured."""
    out: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in report["rows"]:
        w = row["workload"]
        out[(w["group"], w["mode"], w["dtype"])].append(row)
    return out


def ratio(row: dict, rows: list[dict]) -> float | None:
    """The baseline's median time over this row's (> 1: faster than the baseline), from the
    same worker run only."""
    base_name = GROUPS[row["group"]].baseline
    for other in rows:
        if (other["contestant"] == base_name and other.get("status") == "ok"
                and row.get("status") == "ok"
                and other.get("measured_together") == row.get("measured_together")
                and other["workload"] == row["workload"]):
            return other["median_s"] / row["median_s"]
    return None


def allocator(row: dict) -> str:
    """The allocator setting a row was timed with (rows from before it was recorded ran with
    the environment's, i.e. glibc's default here)."""
    return row.get("malloc", "default")


def x_of(row: dict) -> int:
    """Where a row sits on its group's axis: its length L, or its window K (a K sweep)."""
    return row["workload"][GROUPS[row["group"]].axis]


def axis_name(group_name: str) -> str:
    return {"length": "L", "kernel": "K"}[GROUPS[group_name].axis]


def latest_rows(rows: list[dict]) -> list[dict]:
    """The rows a section shows: the latest of each (contestant, L or K), in measured order. An
    earlier measurement of the same cell (another run, other rounds) stays in the JSON as
    history but counts in no table, curve or target."""
    latest = {(r["contestant"], x_of(r)): r for r in rows}
    return [r for r in rows if latest[(r["contestant"], x_of(r))] is r]


def curve(rows: list[dict], contestant: str, field: str) -> tuple[list[int], list[float]]:
    """(L, value) of a contestant's shown rows (``latest_rows``), only those timed with the
    allocator setting of its latest row: a curve (and its exponent) is one configuration."""
    mine = [r for r in latest_rows(rows) if r["contestant"] == contestant
            and r.get("status") == "ok" and r.get(field) is not None]
    if not mine:
        return [], []
    latest = allocator(mine[-1])
    pts = sorted((x_of(r), r[field]) for r in mine if allocator(r) == latest)
    return [p[0] for p in pts], [p[1] for p in pts]


def grid(rows: list[dict]) -> tuple[list[int], list[str], dict, Callable[[dict], str]]:
    """A section's table layout: its lengths, its contestants in measured order, its rows by
    (contestant, L or K), and a cell marker: "†" on a row timed with another allocator setting
    than the section's latest row (see :func:`allocator_note`)."""
    lengths = sorted({x_of(r) for r in rows})
    names = list(dict.fromkeys(r["contestant"] for r in rows))
    get = {(r["contestant"], x_of(r)): r for r in latest_rows(rows)}
    latest = latest_allocator(rows)
    return lengths, names, get, lambda r: "" if allocator(r) == latest else " †"


def latest_allocator(rows: list[dict]) -> str:
    """The allocator setting of the section's last measured row (a worker that died leaves
    error rows that record none)."""
    timed = [r for r in rows if r.get("status") == "ok"] or rows
    return allocator(timed[-1])


def allocator_note(rows: list[dict]) -> str:
    """One sentence naming the allocator setting the section's rows were timed with."""
    latest = latest_allocator(rows)
    others = sorted({allocator(r) for r in latest_rows(rows) if r.get("status") == "ok"}
                    - {latest})
    text = f"Timed with the allocator setting `{latest}`"
    if others:
        text += "; † with " + ", ".join(f"`{o}`" for o in others) + " (not comparable)"
    return text + "."


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def evaluate(target: Target, report: dict) -> dict | None:
    """The measured value of ``target`` in ``report`` and whether it is reached (None when the
    report has no rows for it)."""
    rows = sections(report).get((target.group, target.mode, target.dtype), [])
    mine = [r for r in latest_rows(rows)
            if r["contestant"] == target.contestant and r.get("status") == "ok"]
    if target.kind == "exponent":
        xs, ys = curve(rows, target.contestant, "median_s")
        value = fit_exponent(xs, ys)
        if value is None:
            return None
        return {"value": value, "reached": value <= target.value,
                "text": f"exponent {value:.2f} over {axis_name(target.group)} = "
                        f"{xs[0]}..{xs[-1]}"}
    picked = [r for r in mine if target.length in (None, r["workload"]["length"])
              and target.kernel in (None, r["workload"]["kernel"])]
    measured = [(r["workload"]["length"], ratio(r, rows)) for r in picked]
    pairs = [(n, v) for n, v in measured if v is not None]
    if not pairs:
        return None
    if target.kind == "ratio_of_ideal":
        kernel = picked[0]["workload"]["kernel"]
        length, value = min(pairs, key=lambda p: p[1] / (p[0] / kernel))
        share = value / (length / kernel)
        return {"value": share, "reached": share >= target.value,
                "text": f"{value:.1f}x of ideal {length / kernel:.0f}x = {share:.0%} "
                        f"(L={length})"}
    length, value = min(pairs, key=lambda p: p[1])
    where = f"L={length}" if len(pairs) == 1 else f"worst at L={length}"
    return {"value": value, "reached": value >= target.value, "text": f"{value:.2f}x ({where})"}


def section_markdown(key: tuple[str, str, str], rows: list[dict], plot: str | None) -> list[str]:
    group_name, mode, dtype = key
    group = GROUPS[group_name]
    lengths, names, get, mark = grid(rows)
    timed = "forward + backward" if mode == "train" else "forward (no grad)"
    fixed = "" if group.axis == "length" else \
        f", at L = {', '.join(str(n) for n in sorted({r['workload']['length'] for r in rows}))}"
    out = [f"## {group_name}: {mode}, {dtype}", "", group.description + f"{fixed}; {timed}. "
           + allocator_note(rows), ""]
    if plot:
        out += [f"![{group_name} {mode} {dtype}]({plot})", ""]
    header = ["contestant", *[f"{axis_name(group_name)}={n}" for n in lengths]]
    many = len(lengths) > 1
    time_rows, memory_rows = [], []
    for name in names:
        cells, mem = [], []
        for n in lengths:
            r = get.get((name, n))
            if r is None or r.get("status") != "ok":
                cells.append("–" if r is None else r["status"])
                mem.append("–")
                continue
            rel = ratio(r, rows)
            gemm = r.get("gemm_fraction")
            cells.append(f"{fmt_ms(r['median_s'])} ms ±{r['spread']:.0%}{mark(r)}"
                         + (f" · {rel:.2f}x" if rel is not None else "")
                         + (f" · {gemm:.0%} GEMM" if gemm is not None else ""))
            mem.append("n/a" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}")
        if many:
            xs, ys = curve(rows, name, "median_s")
            exp = fit_exponent(xs, ys)
            cells.append("–" if exp is None else f"{exp:.2f}")
            xs, ys = curve(rows, name, "peak_mb")
            exp = fit_exponent(xs, ys)
            mem.append("–" if exp is None else f"{exp:.2f}")
        time_rows.append([name, *cells])
        memory_rows.append([name, *mem])
    calls = sorted({r.get("calls", 1) for r in latest_rows(rows) if r.get("status") == "ok"})
    sample = ""
    if calls and calls != [1]:  # rows measured before samples were sized have no "calls"
        span = str(calls[0]) if len(calls) == 1 else f"{calls[0]}-{calls[-1]}"
        sample = (f" (a round's sample is the mean of {span} calls back to back: a short "
                  "step is repeated to make a sample of measurable length)")
    out += [f"Median time of the rounds{sample} ±(max - min) / median · speed relative to "
            f"`{group.baseline}` · nominal FLOP rate as a share of the measured GEMM rate:", "",
            markdown_table(header + (["time exponent"] if many else []), time_rows), "",
            "Peak memory above the inputs (MB):", "",
            markdown_table(header + (["memory exponent"] if many else []), memory_rows)]
    return out


def markdown(report: dict, plots: dict[tuple[str, str, str], str] | None = None) -> str:
    plots = plots or {}
    m = report["machine"]
    peers = ", ".join(f"{k} {v}" for k, v in report.get("peers", {}).items())
    out = [f"# attnlab bench: suite `{report['suite']}` on {report['device']}", "",
           f"Machine: {describe(m)}; {m.get('torch_threads', '?')} torch threads.", "",
           f"Peers installed: {peers}.", "", "Produced by:", ""]
    out += [f"- `{r['command']}` ({r['date']}, attnlab {r['attnlab']} @ {r['commit']}, "
            f"allocator `{r.get('malloc', 'default')}`)" for r in report["runs"]]
    gemm: dict[str, list[float]] = {}
    for row in report["rows"]:
        if row.get("gemm_flops_per_s"):
            gemm.setdefault(row["workload"]["dtype"], []).append(row["gemm_flops_per_s"])
    if gemm:
        out += ["", "Measured GEMM rate (median over the workloads' measurements): " + ", ".join(
            f"{dtype} {sorted(v)[len(v) // 2] / 1e9:.0f} GFLOP/s" for dtype, v in gemm.items())
            + "."]
    evaluated = [(t, evaluate(t, report)) for t in TARGETS]
    verdicts = [(t, v) for t, v in evaluated if v is not None]
    if verdicts:
        out += ["", "## Targets", "", markdown_table(
            ["target", "measured", "verdict"],
            [[t.label, v["text"], "reached" if v["reached"] else "missed"]
             for t, v in verdicts])]
    for key, rows in sections(report).items():
        out += [""] + section_markdown(key, rows, plots.get(key))
    other = [r for rows in sections(report).values() for r in latest_rows(rows)
             if r.get("status") != "ok"]
    if other:
        out += ["", "## Not measured", ""] + [
            f"- {r['contestant']} ({Workload.from_key(r['workload']).label()}): "
            f"{r['status']}: {r.get('reason', '')}" for r in other]
    return "\n".join(out) + "\n"


def write_plots(report: dict, stem: Path) -> dict[tuple[str, str, str], str]:
    """Log-log time and memory against L for every section with two lengths or more;
    returns the file name of each section's plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for key, rows in sections(report).items():
        if len({x_of(r) for r in rows}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r["contestant"] for r in rows):
            for ax, field in zip(axes, ("median_s", "peak_mb"), strict=True):
                xs, ys = curve(rows, name, field)
                if xs:
                    ax.plot(xs, ys, marker="o", label=name)
        for ax, title in zip(axes, ("median time (s)", "peak memory (MB)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis_name(key[0]))
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{report['suite']}: {key[0]} {key[1]} {key[2]} on {report['device']}")
        fig.tight_layout()
        path = Path(f"{stem}-{'-'.join(key)}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written[key] = path.name
    return written


def write_outputs(report: dict, json_path: Path, *, plots: bool = True) -> Path:
    """The Markdown (and plots) next to the JSON; returns the Markdown's path."""
    stem = json_path.with_suffix("")
    drawn = write_plots(report, stem) if plots else {}
    md = json_path.with_suffix(".md")
    md.write_text(markdown(report, drawn))
    return md


# --- README tables -------------------------------------------------------------------------

BLOCK = re.compile(r"(<!-- bench: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- /bench -->)",
                   re.DOTALL)


def readme_table(report: dict, group: str, mode: str, dtype: str) -> str:
    """A compact table of one section: median time, ratio to the baseline, peak memory."""
    rows = sections(report).get((group, mode, dtype))
    if not rows:
        raise ValueError(f"the report has no rows for {group} {mode} {dtype}")
    lengths, names, get, mark = grid(rows)
    body = []
    for name in names:
        cells = []
        for n in lengths:
            r = get.get((name, n))
            if r is None or r.get("status") != "ok":
                cells.append("–" if r is None else r["status"])
                continue
            rel = ratio(r, rows)
            mem = "" if r.get("peak_mb") is None else f", {r['peak_mb']:.0f} MB"
            cells.append(f"{fmt_ms(r['median_s'])} ms{mark(r)}"
                         + (f" ({rel:.2f}x)" if rel else "") + mem)
        body.append([name, *cells])
    return (markdown_table(["contestant", *[f"{axis_name(group)}={n}" for n in lengths]], body)
            + "\n\n"
            + allocator_note(rows))


def update_readme(readme: Path, root: Path) -> int:
    """Regenerate every ``<!-- bench: RESULTS.json GROUP MODE DTYPE -->`` block of ``readme``
    from the recorded JSON (paths relative to ``root``); returns how many blocks."""
    import json

    text = readme.read_text()
    count = 0

    def fill(match: re.Match) -> str:
        nonlocal count
        path, group, mode, dtype = match["args"].split()
        report = json.loads((root / path).read_text())
        count += 1
        return match[1] + readme_table(report, group, mode, dtype) + "\n" + match[4]

    readme.write_text(BLOCK.sub(fill, text))
    return count
