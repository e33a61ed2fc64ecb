"""Reports of a sweep: a Markdown file with PNG plots, and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.arena.stats import fmt, mean_ci
from attnlab.tasks import TASKS


@dataclass
class Summary:
    """Aggregates of one sweep, by contestant (in order of first appearance)."""

    sweep: str
    task: str
    metric: str
    higher_is_better: bool
    slice_axis: str
    description: str
    labels: list[str]
    rows: list[dict[str, Any]]
    table: list[dict[str, Any]]              # one entry per contestant
    slices: dict[str, dict[str, float]]      # label -> slice value -> mean over seeds
    baselines: dict[str, dict[str, float]]   # baseline -> slice value -> mean over seeds
    curves: dict[str, tuple[list[int], list[float]]]  # label -> mean train-loss curve
    config: dict[str, Any]                   # one run's config (task, model, train)
    slice_metric: str = ""                   # the metric the slices hold


def summarize(rows: list[dict[str, Any]]) -> Summary:
    """Aggregate a sweep's rows (as ``RunStore.rows`` returns them)."""
    if not rows:
        raise ValueError("no runs to report")
    task = rows[0]["task"]
    cls = TASKS[task]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    table, slices, curves = [], {}, {}
    base_acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label in labels:
        runs = by_label[label]
        done = [r for r in runs if r["status"] == "done"]
        entry = {"label": label, "mechanism": runs[0]["mechanism"], "done": len(done),
                 "failed": len(runs) - len(done), "seeds": sorted(r["seed"] for r in done)}
        names = list(dict.fromkeys(k for r in done for k in r["metrics"]))
        entry["metrics"] = {k: mean_ci([r["metrics"].get(k) for r in done]) for k in names}
        entry["params"] = done[0]["params"] if done else None
        entry["wall_time"] = mean_ci([r["wall_time"] for r in done])[0]
        table.append(entry)
        keys = list(dict.fromkeys(k for r in done for k in r["slices"]))
        slices[label] = {k: mean_ci([r["slices"].get(k) for r in done])[0] for k in keys}
        for r in done:
            for name, values in r["baselines"].items():
                for k, v in values.items():
                    base_acc[name][k].append(v)
        if done:
            steps = done[0]["curves"]["step"]
            losses = [r["curves"]["train_loss"] for r in done
                      if r["curves"].get("step") == steps]
            curves[label] = (steps, [sum(c) / len(c) for c in zip(*losses, strict=True)])
    baselines = {n: {k: sum(v) / len(v) for k, v in vals.items()} for n, vals in
                 base_acc.items()}
    return Summary(rows[0]["sweep"], task, cls.metric, cls.higher_is_better, cls.slice_axis,
                   cls.description, labels, rows, table, slices, baselines, curves,
                   rows[0]["config"], cls.slice_metric or cls.metric)


def ranked(summary: Summary) -> list[dict[str, Any]]:
    """Contestants best first by the primary metric (failed-only ones last)."""
    sign = -1 if summary.higher_is_better else 1

    def key(e: dict) -> float:
        m = e["metrics"].get(summary.metric, (math.nan, math.nan))[0]
        return math.inf if math.isnan(m) else sign * m

    return sorted(summary.table, key=key)


def table_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (shared by the CLI, Markdown and HTML)."""
    arrow = "↑" if summary.higher_is_better else "↓"
    names = list(dict.fromkeys(k for e in summary.table for k in e["metrics"]))
    chosen = TASKS[summary.task].table_metrics
    extra = [k for k in chosen if k in names] if chosen is not None else \
        [k for k in names if k != summary.metric][:3]
    header = ["contestant", "mechanism", f"{summary.metric} {arrow}", *extra,
              "seeds", "params", "s/run"]
    rows = []
    for e in ranked(summary):
        m = e["metrics"]
        seeds = f"{e['done']}" + (f" (+{e['failed']} failed)" if e["failed"] else "")
        rows.append([e["label"], e["mechanism"], fmt(*m.get(summary.metric, (math.nan,) * 2)),
                     *[fmt(*m[k], digits=3) if k in m else "–" for k in extra], seeds,
                     f"{e['params']:,}" if e["params"] else "–",
                     f"{e['wall_time']:.1f}" if not math.isnan(e["wall_time"]) else "–"])
    return header, rows


def slice_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Metric per slice value: contestants, then the closed-form baselines."""
    keys = list(dict.fromkeys(k for s in (*summary.slices.values(),
                                          *summary.baselines.values()) for k in s))
    header = ["", *keys]
    rows = [[label, *[f"{summary.slices[label].get(k, math.nan):.4g}" for k in keys]]
            for label in summary.labels if summary.slices.get(label)]
    rows += [[f"{name} (baseline)", *[f"{vals.get(k, math.nan):.4g}" for k in keys]]
             for name, vals in summary.baselines.items()]
    return header, rows


def _numeric(keys: list[str]) -> bool:
    try:
        [float(k) for k in keys]
    except ValueError:
        return False
    return True


def figures(summary: Summary) -> dict[str, bytes]:
    """PNG images: 'curves' (training loss) and 'slices' (metric per slice, baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, (steps, loss) in summary.curves.items():
        ax.plot(steps, loss, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    if summary.curves and min(min(c[1]) for c in summary.curves.values()) > 0:
        ax.set_yscale("log")
    ax.set_title(f"{summary.sweep}: training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out["curves"] = _png(fig, plt)

    keys = list(dict.fromkeys(k for s in summary.slices.values() for k in s))
    if keys:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        numeric = _numeric(keys)
        xs = [float(k) for k in keys] if numeric else list(range(len(keys)))
        for label in summary.labels:
            vals = summary.slices.get(label, {})
            ax.plot(xs, [vals.get(k, math.nan) for k in keys], marker="o", label=label)
        styles = ("--", ":", "-.", (0, (5, 1, 1, 1)))  # baselines: grey, one dash each
        for i, (name, vals) in enumerate(summary.baselines.items()):
            ax.plot(xs, [vals.get(k, math.nan) for k in keys], linestyle=styles[i % 4],
                    marker="x", color=str(0.15 + 0.15 * (i % 4)), label=f"{name} (baseline)")
        if numeric and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, keys)
        ax.set_xlabel(summary.slice_axis)
        ax.set_ylabel(f"test {summary.slice_metric} (mean over seeds)")
        ax.set_title(f"{summary.sweep}: {summary.slice_metric} per {summary.slice_axis}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["slices"] = _png(fig, plt)
    return out


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def setup_lines(summary: Summary) -> list[str]:
    c = summary.config
    train = ", ".join(f"{k}={v}" for k, v in c.get("train", {}).items())
    model = ", ".join(f"{k}={v}" for k, v in c.get("model", {}).items())
    params = ", ".join(f"{k}={v}" for k, v in c.get("task_params", {}).items())
    models = {}
    for r in summary.rows:  # contestants may override the model (e.g. the head count)
        models.setdefault(r["label"], ", ".join(f"{k}={v}" for k, v in
                                                r["config"].get("model", {}).items()))
    if len(set(models.values())) > 1:
        model = "; ".join(f"{label}: {m}" for label, m in models.items())
    kwargs = {r["label"]: r["config"].get("kwargs") for r in summary.rows
              if r["config"].get("kwargs")}
    lines = [f"task `{summary.task}` ({summary.description}): {params}",
             f"model: {model}", f"training (every contestant): AdamW, warm-up + cosine, "
             f"{train}"]
    if kwargs:
        lines.append("mechanism arguments: " + "; ".join(
            f"{label}: " + ", ".join(f"{k}={v}" for k, v in kw.items())
            for label, kw in kwargs.items()))
    machines = sorted({r["config"].get("machine", "") for r in summary.rows} - {""})
    lines += [f"machine: {m}" for m in machines]
    return lines


def write_report(summary: Summary, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNGs) and the self-contained ``report.html`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = figures(summary)
    for name, data in images.items():
        (out / f"{name}.png").write_bytes(data)
    header, rows = table_rows(summary)
    s_header, s_rows = slice_rows(summary)
    failures = [(r["label"], r["seed"], (r["error"] or "").splitlines()[0])
                for r in summary.rows if r["status"] == "failed"]
    title = f"Arena report: {summary.sweep}"
    md = [f"# {title}", "", *[f"- {line}" for line in setup_lines(summary)], "",
          "## Test metrics (mean ± 95% CI over seeds)", "", _md_table(header, rows), "",
          f"## {summary.slice_metric} per {summary.slice_axis}", "",
          _md_table(s_header, s_rows), "",
          f"![{summary.slice_metric} per {summary.slice_axis}](slices.png)" if "slices" in images
          else "", "", "## Training loss", "", "![training loss](curves.png)", ""]
    if failures:
        md += ["## Failed runs", ""] + [f"- {lab} seed {seed}: {err}"
                                       for lab, seed, err in failures] + [""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    def img(name: str) -> str:
        data = base64.b64encode(images[name]).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    parts = [f"<h1>{html.escape(title)}</h1><ul>" +
             "".join(f"<li>{html.escape(line)}</li>" for line in setup_lines(summary)) +
             "</ul>", "<h2>Test metrics (mean ± 95% CI over seeds)</h2>",
             _html_table(header, rows),
             f"<h2>{html.escape(summary.slice_metric)} per {html.escape(summary.slice_axis)}"
             "</h2>",
             _html_table(s_header, s_rows), img("slices") if "slices" in images else "",
             "<h2>Training loss</h2>", img("curves")]
    if failures:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li>{html.escape(f'{lab} seed {seed}: {err}')}</li>"
            for lab, seed, err in failures) + "</ul>")
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;"
             "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid "
             "#ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:"
             "left}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    html_path = out / "report.html"
    html_path.write_text(page)
    return md_path, html_path
