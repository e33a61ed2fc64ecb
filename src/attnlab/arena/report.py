"""Reports of a sweep: a Markdown file with PNG plots, and one self-contained HTML page.

Contestants appear in the configuration's order, never ranked: the paired difference to the
reference contestant (with its 95% interval) says which differences the seeds support.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path
from typing import Any

from attnlab.arena.files import write_atomic
from attnlab.arena.stats import LEVEL, fmt, fmt_paired, mean_ci
from attnlab.arena.summary import Summary, curve_band, summarize
from attnlab.machine import provenance
from attnlab.tables import markdown_table
from attnlab.tasks import TASKS

Section = tuple[str, list[tuple[str, Any]]]  # heading, [("table" | "list" | "image", content)]

__all__ = ["Summary", "summarize", "table_rows", "slice_rows", "seed_rows", "grid_rows",
           "verdict_lines", "figures", "write_report", "write_document", "png"]


def _grid_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())


def table_rows(summary: Summary, compact: bool = False,
               stacked: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (Markdown and HTML; ``compact``: the terminal's,
    without the extra metrics, parameter counts and times; ``stacked``: the compact table for
    a narrow terminal, whose cells take several lines: the mechanism and the chosen grid point
    under the contestant's label, the interval under each estimate)."""
    arrow = "↑" if summary.higher_is_better else "↓"
    names = list(dict.fromkeys(k for c in summary.contestants for k in c.metrics
                               if not k.startswith("val_")))
    chosen = TASKS[summary.task].table_metrics
    extra = [k for k in chosen if k in names] if chosen is not None else \
        [k for k in names if k != summary.metric][:3]
    if compact:
        extra = []
    header = ["contestant", "mechanism", *(["chosen"] if summary.grid_keys else []),
              f"{summary.metric} {arrow}", f"Δ vs {summary.reference}", "differs",
              *extra, "seeds", "params", "s/run"]
    rows = []
    for c in summary.contestants:
        m = c.metrics
        done = len(c.chosen.runs) if c.chosen else 0
        failed = sum(len(p.failed) for p in c.points)
        seeds = f"{done}" + (f" (+{failed} failed)" if failed else "")
        if c.label == summary.reference:
            delta, differs = "(reference)", ""
        elif c.paired is None:
            delta, differs = "–", ""
        else:
            delta = fmt_paired(c.paired)
            differs = ("yes" if c.paired.decided else "no") if c.paired.pairs >= 2 else "–"
        rows.append([c.label, c.mechanism,
                     *([_grid_text(c.chosen.values) if c.chosen else "–"]
                       if summary.grid_keys else []),
                     fmt(*m.get(summary.metric, (math.nan,) * 2)), delta, differs,
                     *[fmt(*m[k], digits=3) if k in m else "–" for k in extra], seeds,
                     f"{c.params:,}" if c.params else "–",
                     f"{c.wall_time:.1f}" if not math.isnan(c.wall_time) else "–"])
    if compact:  # drop the mechanism column when it repeats the label; params and s/run
        same = all(c.label == c.mechanism for c in summary.contestants)
        keep = [i for i, h in enumerate(header) if h not in ("params", "s/run")
                and not (same and h == "mechanism")]
        header = [header[i] for i in keep]
        rows = [[r[i] for i in keep] for r in rows]
    if compact and stacked:
        header, rows = _stack(header, rows)
    return header, rows


def _stack(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The compact table with its side columns folded into the first one and each interval
    on the line under its estimate, so that it fits in about 60 columns."""
    side = [i for i, h in enumerate(header) if h in ("mechanism", "chosen")]
    keep = [i for i in range(len(header)) if i not in side]
    stacked = []
    for row in rows:
        first = "\n".join([row[0], *(row[i] for i in side if row[i] not in ("–", row[0]))])
        rest = [row[i].replace(" ± ", "\n± ").replace(" [", "\n[") for i in keep[1:]]
        stacked.append([first, *rest])
    return [header[keep[0]], *(header[i] for i in keep[1:])], stacked


def slice_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Metric per slice value (mean ± 95% CI): contestants, then the closed-form baselines."""
    keys = list(dict.fromkeys(k for s in (*(c.slices for c in summary.contestants),
                                          *summary.baselines.values()) for k in s))
    header = ["", *keys]
    rows = [[c.label, *[fmt(*c.slices.get(k, (math.nan, math.nan)), digits=4) for k in keys]]
            for c in summary.contestants if c.slices]
    rows += [[f"{name} (baseline)", *[f"{vals.get(k, math.nan):.4g}" for k in keys]]
             for name, vals in summary.baselines.items()]
    return header, rows


def seed_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """The test metric of each contestant's chosen configuration, seed by seed."""
    seeds = sorted({s for c in summary.contestants if c.chosen
                    for s in c.chosen.per_seed(summary.metric)})
    header = ["contestant", *[f"seed {s}" for s in seeds]]
    rows = []
    for c in summary.contestants:
        values = c.chosen.per_seed(summary.metric) if c.chosen else {}
        rows.append([c.label, *[f"{values[s]:.4g}" if s in values else "–" for s in seeds]])
    return header, rows


def grid_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Every grid point of every contestant: validation (which chooses) and test metric."""
    header = ["contestant", *summary.grid_keys, f"validation {summary.metric}",
              f"test {summary.metric}", "seeds", "chosen"]
    rows = []
    for c in summary.contestants:
        for p in c.points:
            test = [r["metrics"].get(summary.metric) for r in p.runs]
            rows.append([c.label, *[f"{p.values[k]:g}" if isinstance(p.values[k], float)
                                    else str(p.values[k]) for k in summary.grid_keys],
                         fmt(*p.val), fmt(*mean_ci(test)), str(len(p.runs)),
                         "✓" if p is c.chosen else ""])
    return header, rows


def verdict_lines(summary: Summary) -> list[str]:
    """One sentence per contestant against the reference: decided or not, and which way."""
    lines = []
    direction = "higher" if summary.higher_is_better else "lower"
    for c in summary.contestants:
        if c.label == summary.reference or c.paired is None:
            continue
        p = c.paired
        if p.pairs < 2:
            lines.append(f"{c.label} vs {summary.reference}: fewer than two paired seeds, "
                         "nothing can be said.")
        elif p.decided:
            word = "better" if summary.better(p.mean) else "worse"
            lines.append(f"**{c.label} is {word} than {summary.reference}** on "
                         f"{summary.metric} ({direction} is better): difference "
                         f"{fmt_paired(p)}, the 95% interval over {p.pairs} paired seeds "
                         "excludes 0.")
        else:
            lines.append(f"{c.label} vs {summary.reference}: no difference shown on "
                         f"{summary.metric}: {fmt_paired(p)} over {p.pairs} paired seeds "
                         "includes 0.")
    return lines


def _numeric(keys: list[str]) -> bool:
    try:
        [float(k) for k in keys]
    except ValueError:
        return False
    return True


def figures(summary: Summary) -> dict[str, bytes]:
    """PNG images: 'curves' (training loss, 95% bands) and 'slices' (metric per slice with
    95% error bars, and the baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    positive = True
    for c in summary.contestants:
        if c.chosen is None:
            continue
        steps, mean, half = curve_band(c.chosen)
        if not steps:
            continue
        line, = ax.plot(steps, mean, label=_plain(c.label))
        low = [m - (0 if math.isnan(h) else h) for m, h in zip(mean, half, strict=True)]
        high = [m + (0 if math.isnan(h) else h) for m, h in zip(mean, half, strict=True)]
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        positive = positive and min(low) > 0
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean, {LEVEL:.0%} band over seeds)")
    if positive and ax.lines:
        ax.set_yscale("log")
    ax.set_title(_plain(f"{summary.sweep}: training loss"))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out["curves"] = png(fig, plt)

    keys = list(dict.fromkeys(k for c in summary.contestants for k in c.slices))
    if keys:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        numeric = _numeric(keys)
        xs = [float(k) for k in keys] if numeric else list(range(len(keys)))
        for c in summary.contestants:
            means = [c.slices.get(k, (math.nan, math.nan))[0] for k in keys]
            halves = [c.slices.get(k, (math.nan, math.nan))[1] for k in keys]
            ax.errorbar(xs, means, yerr=[0 if math.isnan(h) else h for h in halves],
                        marker="o", capsize=3, label=_plain(c.label))
        styles = ("--", ":", "-.", (0, (5, 1, 1, 1)))  # baselines: grey, one dash each
        for i, (name, vals) in enumerate(summary.baselines.items()):
            ax.plot(xs, [vals.get(k, math.nan) for k in keys], linestyle=styles[i % 4],
                    marker="x", color=str(0.15 + 0.15 * (i % 4)),
                    label=_plain(f"{name} (baseline)"))
        if numeric and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_plain(k) for k in keys])
        ax.set_xlabel(_plain(summary.slice_axis))
        ax.set_ylabel(f"test {summary.slice_metric} (mean, {LEVEL:.0%} CI)")
        ax.set_title(_plain(f"{summary.sweep}: {summary.slice_metric} per "
                            f"{summary.slice_axis}"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["slices"] = png(fig, plt)
    return out


def _plain(text: str) -> str:
    """Text matplotlib shows as written: ``$`` would start math text (and a label such as
    ``$\\notacommand$`` made every report fail)."""
    return str(text).replace("$", r"\$")


def _md(text: str) -> str:
    """User text (labels, names, errors) for Markdown: HTML in it is shown, not rendered."""
    return html.escape(str(text), quote=False)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table([_md(h) for h in header], [[_md(c) for c in r] for r in rows])


def png(fig: Any, plt: Any) -> bytes:
    """A matplotlib figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _items(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def setup_lines(summary: Summary) -> list[str]:
    """The task, model, budget, grid, mechanism arguments, and where the numbers came from."""
    c = summary.config
    train = {k: v for k, v in c.get("train", {}).items() if k not in summary.grid_keys}
    models: dict[str, str] = {}
    for r in summary.rows:  # contestants may override the model (e.g. the head count)
        models.setdefault(r["label"], _items(r["config"].get("model", {})))
    model = models[summary.rows[0]["label"]]
    if len(set(models.values())) > 1:
        model = "; ".join(f"{label}: {m}" for label, m in models.items())
    lines = [f"task `{summary.task}` ({summary.description}): "
             f"{_items(c.get('task_params', {}))}",
             f"model: {model}",
             f"training (every contestant): AdamW, warm-up + cosine, {_items(train)}"]
    if summary.grid_keys:
        grid = {k: sorted({p.values[k] for x in summary.contestants for p in x.points})
                for k in summary.grid_keys}
        lines.append("tuned per contestant on the validation split (never the test): " +
                     "; ".join(f"{k} in {v}" for k, v in grid.items()))
    for key in ("kwargs", "eval_kwargs"):
        given = {r["label"]: r["config"].get(key) for r in summary.rows
                 if r["config"].get(key)}
        if given:
            what = "mechanism arguments" if key == "kwargs" else \
                "mechanism arguments at evaluation (trained weights loaded)"
            lines.append(f"{what}: " + "; ".join(f"{label}: {_items(kw)}"
                                                  for label, kw in given.items()))
    lines.append(f"paired differences: to `{summary.reference}`, seed by seed (every run "
                 "is tested on the same fixed test set)")
    done = [r for r in summary.rows if r["status"] == "done"]
    prov = [r["config"].get("provenance", {}) for r in done]
    for cmd in sorted({p.get("command", "") for p in prov} - {""}):
        lines.append(f"runs made by: `{cmd}`")
    versions = sorted({f"attnlab {p.get('attnlab')} (commit {p.get('commit')})" for p in prov
                       if p})
    lines += [f"code: {v}" for v in versions]
    if done:
        first = time.strftime("%Y-%m-%d %H:%M", time.localtime(min(r["finished"] for r in done)))
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(r["finished"] for r in done)))
        lines.append(f"runs finished: {first} to {last}")
    machines = sorted({r["config"].get("machine", "") for r in summary.rows} - {""})
    lines += [f"machine: {m}" for m in machines]
    me = provenance()
    lines.append(f"report written by: `{me['command']}` on {me['date']} "
                 f"(attnlab {me['attnlab']}, commit {me['commit']})")
    return lines


def write_report(summary: Summary, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and the self-contained ``report.html`` in ``out_dir``."""
    out = Path(out_dir)
    images = figures(summary)
    sections: list[Section] = [
        ("Test metrics (mean ± 95% CI over seeds; Δ: paired difference to the reference)",
         [("table", table_rows(summary))]),
        ("Verdict", [("list", verdict_lines(summary) or ["one contestant: nothing to "
                                                          "compare"])]),
        (f"{summary.slice_metric} per {summary.slice_axis} (mean ± 95% CI)",
         [("table", slice_rows(summary))] +
         ([("image", "slices")] if "slices" in images else [])),
        (f"Test {summary.metric} per seed (chosen configuration)",
         [("table", seed_rows(summary))]),
    ]
    if summary.grid_keys:
        sections.append(("Tuning grid (chosen: best mean validation metric)",
                         [("table", grid_rows(summary))]))
    sections.append(("Training loss (mean and 95% band over seeds)", [("image", "curves")]))
    failures = [f"{r['label']} seed {r['seed']}: {(r['error'] or '').splitlines()[0]}"
                for r in summary.rows if r["status"] == "failed"]
    if failures:
        sections.append(("Failed runs", [("list", failures)]))
    return write_document(out, f"Arena report: {summary.sweep}", setup_lines(summary),
                          sections, images)


def write_document(out_dir: str | Path, title: str, setup: list[str],
                   sections: list[Section], images: dict[str, bytes]) -> tuple[Path, Path]:
    """``report.md`` (with the PNGs of ``images`` beside it) and one self-contained
    ``report.html`` (the PNGs inlined) in ``out_dir``. ``sections``: (heading, parts), a part
    being ("table", (header, rows)), ("list", lines) or ("image", name in ``images``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        write_atomic(out / f"{name}.png", data)
    md = [f"# {_md(title)}", "", *[f"- {_md(line)}" for line in setup], ""]
    page = [f"<h1>{html.escape(title)}</h1><ul>" +
            "".join(f"<li>{html.escape(line)}</li>" for line in setup) + "</ul>"]
    for heading, parts in sections:
        md += [f"## {_md(heading)}", ""]
        page.append(f"<h2>{html.escape(heading)}</h2>")
        for kind, content in parts:
            if kind == "table":
                md += [_md_table(*content), ""]
                page.append(_html_table(*content))
            elif kind == "list":
                md += [f"- {_md(line)}" for line in content] + [""]
                page.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>"
                                             for line in content) + "</ul>")
            else:
                md += [f"![{_md(heading)}]({content}.png)", ""]
                data = base64.b64encode(images[content]).decode()
                page.append(f'<img alt="{content}" src="data:image/png;base64,{data}">')
    md_path = out / "report.md"
    write_atomic(md_path, "\n".join(md))
    style = ("body{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;"
             "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid "
             "#ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:"
             "left}img{max-width:100%}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{style}</style></head><body>{''.join(page)}</body></html>")
    html_path = out / "report.html"
    write_atomic(html_path, doc)
    return md_path, html_path
