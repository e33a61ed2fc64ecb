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
from attnlab.arena.stats import LEVEL, fmt, fmt_paired, is_finite, mean_ci
from attnlab.arena.summary import Contestant, GridPoint, Summary, curve_band, summarize
from attnlab.machine import provenance
from attnlab.tables import markdown_table
from attnlab.tasks import TASKS

# heading, [("table" | "list" | "image" | "images", content)]
Section = tuple[str, list[tuple[str, Any]]]

__all__ = ["Summary", "summarize", "table_rows", "slice_rows", "seed_rows", "grid_rows",
           "verdict_lines", "budget_line", "recipe_text", "tuning_text", "delta_text",
           "verdict_word", "same_seeds", "figures", "validation_band", "write_report",
           "write_document", "png"]


def _grid_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())


def table_rows(summary: Summary, compact: bool = False, stacked: bool = False,
               mechanism: bool = True, grid: bool = True,
               seeds: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table.

    The full table (Markdown and HTML) has the chosen grid point as ``lr=0.003`` in one
    "chosen" column, the extra metrics, parameter counts and times. ``compact``: the
    terminal's, without the extras, with one narrow column per tuned key (headed by the key,
    e.g. "lr"), and without the mechanism column when every label is its mechanism;
    ``mechanism=False`` or ``grid=False`` drop those columns too (the verdict lines name both),
    and ``seeds=False`` the seeds column (for when ``same_seeds``: the budget line says it).
    ``stacked``: each interval on the line under its estimate, so the table is narrower; the
    label's cell always stays one line.
    """
    arrow = "↑" if summary.higher_is_better else "↓"
    names = list(dict.fromkeys(k for c in summary.contestants for k in c.metrics
                               if not k.startswith("val_")))
    chosen = TASKS[summary.task].table_metrics
    extra = [k for k in chosen if k in names] if chosen is not None else \
        [k for k in names if k != summary.metric][:3]
    keys = summary.grid_keys if grid else []
    if compact:
        extra = []
        grid_header = list(keys)
    else:
        grid_header = ["chosen"] if keys else []
    header = ["contestant", "mechanism", *grid_header, f"{summary.metric} {arrow}",
              f"Δ vs {summary.reference}", "verdict", *extra, "seeds", "params", "s/run"]
    rows = []
    for c in summary.contestants:
        m = c.metrics
        point = _point_cells(c, keys) if compact else \
            ([_grid_text(c.chosen.values) if c.chosen else "–"] if keys else [])
        rows.append([c.label, c.mechanism, *point,
                     fmt(*m.get(summary.metric, (math.nan,) * 2)), delta_text(summary, c),
                     verdict_word(summary, c),
                     *[fmt(*m[k], digits=3) if k in m else "–" for k in extra],
                     _seeds_text(c), f"{c.params:,}" if c.params else "–",
                     f"{c.wall_time:.1f}" if not math.isnan(c.wall_time) else "–"])
    if compact:  # drop the mechanism column when it repeats the label; params and s/run
        same = all(c.label == c.mechanism for c in summary.contestants)
        keep = [i for i, h in enumerate(header) if h not in ("params", "s/run")
                and not ((same or not mechanism) and h == "mechanism")
                and not (not seeds and h == "seeds")]
        header = [header[i] for i in keep]
        rows = [[r[i] for i in keep] for r in rows]
    if stacked:
        rows = [[r[0], *(_stack(cell) for cell in r[1:])] for r in rows]
    return header, rows


def _point_cells(c: Contestant, keys: list[str]) -> list[str]:
    """The chosen grid point's value of each tuned key ('–' without a finished run)."""
    return [_num(c.chosen.values[k]) if c.chosen else "–" for k in keys]


def _seeds_text(c: Contestant) -> str:
    """Finished seeds of the chosen point, and failed runs of the contestant: '5 (+1 failed)'."""
    done = len(c.chosen.runs) if c.chosen else 0
    failed = sum(len(p.failed) for p in c.points)
    return f"{done}" + (f" (+{failed} failed)" if failed else "")


def same_seeds(summary: Summary) -> bool:
    """Whether every contestant finished every seed of the sweep at its chosen point, with
    no failed run: the seeds column then only repeats the budget line's count."""
    seeds = len({r["seed"] for r in summary.rows})
    return all(_seeds_text(c) == str(seeds) for c in summary.contestants)


def _stack(cell: str) -> str:
    """A cell on two lines: the interval, '± half', 'on every seed' or '(+n failed)' under
    the value."""
    for sep in (" ± ", " [", " on every seed", " (+"):
        if sep in cell:
            head, _, tail = cell.partition(sep)
            return f"{head}\n{sep.lstrip()}{tail}"
    return cell


def delta_text(summary: Summary, c: Contestant) -> str:
    """The table's paired difference to the reference: '-0.33 [-0.35, -0.31]', '-0.25 on
    every seed' (the same difference on each), '0 on every seed' (equal on each), '–'."""
    p = c.paired
    if c.label == summary.reference:
        return "(reference)"
    if p is None or p.pairs == 0:
        return "–"
    if p.pairs >= 2 and p.equal:
        return "0 on every seed"
    if p.pairs >= 2 and p.constant:
        return f"{p.mean:+.3g} on every seed"
    return fmt_paired(p)


def verdict_word(summary: Summary, c: Contestant) -> str:
    """The table's verdict: 'better' or 'worse' (decided), 'equal' (on every seed),
    'inconclusive' (the 95% interval includes 0), '–' (fewer than two paired seeds)."""
    p = c.paired
    if c.label == summary.reference:
        return ""
    if p is None or p.pairs < 2:
        return "–"
    if p.equal:
        return "equal"
    if p.decided:
        return "better" if summary.better(p.mean) else "worse"
    return "inconclusive"


def slice_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Metric per slice value (mean ± 95% CI): contestants, then the closed-form baselines."""
    per_slice: list[dict[str, Any]] = [*(c.slices for c in summary.contestants),
                                       *summary.baselines.values()]
    keys = list(dict.fromkeys(k for s in per_slice for k in s))
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
    header = ["contestant", *summary.grid_keys,
              f"validation {summary.metric}{tuned_on(summary)}", f"test {summary.metric}",
              "seeds", "chosen"]
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
    """The budget, then one sentence per contestant against the reference: which way the
    comparison went, or that this budget cannot decide it, with the recipe behind it (each
    side's mechanism arguments and the grid point chosen on validation)."""
    lines = [budget_line(summary)]
    ref = summary.contestant(summary.reference)
    others = [c for c in summary.contestants if c is not ref]
    if not others:
        return [*lines, "One contestant: nothing to compare."]
    if ref.chosen is None:
        return [*lines, f"No verdict: the reference {ref.label} has no finished run"
                        f"{_failed_note(ref)}."]
    for c in others:
        lines.append(f"{_comparison(summary, c, ref)}{_recipes(summary, c, ref)}")
    return lines


def budget_line(summary: Summary) -> str:
    """'Budget: 600 steps, batch 64, AdamW; each contestant's lr chosen on validation from
    {0.001, 0.003}; 5 seeds.' (or 'one lr, 0.001, for every contestant, not tuned')."""
    recipe = []
    for key, unit in (("steps", "{} steps"), ("batch_size", "batch {}")):
        values = {} if key in summary.grid_keys else _train_values(summary, key)
        if values:
            recipe.append(unit.format(_one_or_each(values)))
    tuning = []
    if summary.grid_keys:
        grid = _searched(summary.contestants, summary.grid_keys)
        tuning.append(f"each contestant's {' and '.join(summary.grid_keys)} chosen on "
                      f"validation{tuned_on(summary)} from {grid}")
    lrs = {} if "lr" in summary.grid_keys else _train_values(summary, "lr")
    if len(set(lrs.values())) == 1:
        tuning.append(f"one lr, {_one_or_each(lrs)}, for every contestant, not tuned")
    elif lrs:
        tuning.append(f"lr not tuned ({_one_or_each(lrs)})")
    seeds = len({r["seed"] for r in summary.rows})
    tuning.append(f"{seeds} seed{'' if seeds == 1 else 's'}")
    return f"Budget: {', '.join([*recipe, 'AdamW'])}; {'; '.join(tuning)}."


def tuned_on(summary: Summary) -> str:
    """' (seed 0)' / ' (seeds 0, 1)' when the grid point was chosen on some seeds only (a
    sweep with ``tune_seeds``), else ''."""
    return "" if summary.tuning_seeds is None else f" ({_seeds_named(summary.tuning_seeds)})"


def _seeds_named(seeds: list[int]) -> str:
    return f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))}"


def _train_values(summary: Summary, key: str) -> dict[str, str]:
    """A train setting of each contestant's runs (label -> '600'); those without it are
    left out."""
    values: dict[str, str] = {}
    for r in summary.rows:
        value = r["config"].get("train", {}).get(key)
        if value is not None:
            values.setdefault(r["label"], _num(value))
    return values


def _one_or_each(values: dict[str, str]) -> str:
    """'600' when every contestant has the same value, else 'a 600, b 300'."""
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{label} {v}" for label, v in values.items())


def _num(value: Any) -> str:
    """A setting as a sweep file would write it: 0.001, 64, true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sorted(values: set[Any]) -> list[Any]:
    """Grid values in order (numbers by value, anything else by its text)."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def _searched(contestants: list[Contestant], keys: list[str]) -> str:
    """The grid the contestants' points span: '{0.001, 0.003}' for one tuned key, 'lr {...}
    x weight_decay {...}' for several."""
    sets = {k: _sorted({p.values[k] for c in contestants for p in c.points}) for k in keys}
    text = {k: "{" + ", ".join(map(_num, v)) + "}" for k, v in sets.items()}
    if len(keys) == 1:
        return text[keys[0]]
    return " x ".join(f"{k} {t}" for k, t in text.items())


def _failed_note(c: Contestant) -> str:
    failed = sum(len(p.failed) for p in c.points)
    return f" ({failed} run{'' if failed == 1 else 's'} failed)" if failed else ""


def _comparison(summary: Summary, c: Contestant, ref: Contestant) -> str:
    """The sentence comparing ``c`` to the reference ``ref`` (which has a finished run)."""
    metric, p = summary.metric, c.paired
    versus = f"{c.label} vs {ref.label} on {metric}"
    if c.chosen is None or p is None:
        return f"{versus}: nothing to compare, {c.label} has no finished run{_failed_note(c)}."
    common, bad = _non_finite(summary, c, ref)
    if p.pairs == 0:
        if not common:
            return f"{versus}: nothing to compare, no seed finished by both."
        return (f"{versus}: nothing to compare, the {metric} is not finite on every seed both "
                f"finished ({_counts(bad)}).")
    dropped = len(common) - p.pairs
    left_out = (f"; {dropped} seed{'' if dropped == 1 else 's'} left out: a non-finite "
                f"{metric} ({_counts(bad)})") if dropped else ""
    if p.pairs == 1:
        return (f"{versus}: one paired seed only (difference {p.mean:+.3g}){left_out}: no "
                "interval, nothing decided.")
    if p.equal:
        tie = _tie_value(summary, c, ref)
        return f"{versus}: equal on every seed ({p.pairs} paired seeds{tie}){left_out}."
    if p.decided:
        direction = "higher" if summary.higher_is_better else "lower"
        word = "better" if summary.better(p.mean) else "worse"
        head = (f"**{c.label} is {word} than {ref.label}** on {metric} ({direction} is "
                "better): ")
        if p.constant:
            way = "higher" if p.mean > 0 else "lower"
            return f"{head}{way} by {abs(p.mean):.3g} on every seed ({p.pairs} paired seeds)" \
                f"{left_out}."
        return (f"{head}difference {fmt_paired(p)}; the 95% interval over {p.pairs} paired "
                f"seeds excludes 0{left_out}.")
    return (f"{versus}: inconclusive at this budget: difference {fmt_paired(p)}; the 95% "
            f"interval over {p.pairs} paired seeds includes 0{left_out}.")


def _paired_values(summary: Summary, c: Contestant, ref: Contestant
                   ) -> tuple[dict[int, float], dict[int, float]]:
    """The test metric per seed of both chosen points (both have finished runs)."""
    assert c.chosen is not None and ref.chosen is not None
    return c.chosen.per_seed(summary.metric), ref.chosen.per_seed(summary.metric)


def _non_finite(summary: Summary, c: Contestant, ref: Contestant
                ) -> tuple[set[int], dict[str, int]]:
    """The seeds both finished, and per side (label -> count) how many of them have a
    non-finite (NaN, infinite or missing) test metric: those seeds are not paired."""
    mine, theirs = _paired_values(summary, c, ref)
    common = set(mine) & set(theirs)
    bad = {x.label: sum(not is_finite(values[s]) for s in common)
           for x, values in ((c, mine), (ref, theirs))}
    return common, {label: n for label, n in bad.items() if n}


def _counts(bad: dict[str, int]) -> str:
    """'sigmoid on 2 seeds, softmax on 1'."""
    return ", ".join(f"{label} on {n} seed{'' if n == 1 else 's'}" for label, n in bad.items())


def _tie_value(summary: Summary, c: Contestant, ref: Contestant) -> str:
    """'; both 1 on each' when both have one and the same value on every paired seed (a
    ceiling or a floor the budget cannot see past)."""
    mine, theirs = _paired_values(summary, c, ref)
    values = {v for s in set(mine) & set(theirs) for v in (mine[s], theirs[s]) if is_finite(v)}
    return f"; both {values.pop():.4g} on each" if len(values) == 1 else ""


def _recipes(summary: Summary, c: Contestant, ref: Contestant) -> str:
    """' Recipes: sigmoid-x: sigmoid(learn_bias=true), lr 0.003 chosen from {0.001, 0.003};
    softmax: lr 0.001 chosen from {0.001, 0.003}.' or ' Both at lr 0.001, not tuned.'."""
    recipes = [f"{x.label}: {text}" for x, other in ((c, ref), (ref, c))
               if (text := recipe_text(summary, x, other))]
    lrs = {} if "lr" in summary.grid_keys else _train_values(summary, "lr")
    pair = {label: v for label, v in lrs.items() if label in (c.label, ref.label)}
    untuned = []
    if len(set(pair.values())) == 1:
        untuned.append(f"both at lr {_one_or_each(pair)}, not tuned")
    elif pair:  # contestants of one sweep share the lr; hand-made rows may not
        untuned.append(f"lr not tuned ({_one_or_each(pair)})")
    if recipes:
        return f" Recipes: {'; '.join(recipes + untuned)}."
    if untuned:
        return f" {untuned[0][0].upper()}{untuned[0][1:]}."
    return ""


def recipe_text(summary: Summary, c: Contestant, other: Contestant | None = None) -> str:
    """What ``c`` is beyond its label: its mechanism with arguments (when the label hides
    them), evaluation-time arguments, model settings that differ from ``other``'s, and the
    grid point chosen on validation with the grid searched ('' when nothing to say)."""
    parts = []
    if c.mechanism != c.label or c.kwargs:
        parts.append(c.mechanism + (f"({_kw(c.kwargs)})" if c.kwargs else ""))
    if c.eval_kwargs:
        parts.append(f"evaluated with {_kw(c.eval_kwargs)}")
    if other is not None:
        model = {k: v for k, v in c.model.items() if other.model.get(k) != v}
        if model:
            parts.append(f"model {_kw(model)}")
    if summary.grid_keys:
        parts.append(tuning_text(summary, c))
    return ", ".join(parts)


def _kw(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in values.items())


def tuning_text(summary: Summary, c: Contestant) -> str:
    """'lr 0.003 chosen from {0.001, 0.003}' (the point best on validation, and the grid
    searched), with the points that had no finished run; '' without a grid."""
    keys = summary.grid_keys
    if not keys:
        return ""
    searched = _searched([c], keys)
    if c.chosen is None:
        return f"no finished run at any point of {searched}"
    point = _point_text(c.chosen.values, keys)
    if math.isnan(c.chosen.val[0]):
        text = (f"{point} taken from {searched}: no finite validation {summary.metric} to "
                "choose by")
    else:
        text = f"{point} chosen from {searched}"
    empty = [p for p in c.points if not p.runs]
    if empty:
        text += " (no finished run at " + "; ".join(
            _point_text(p.values, keys) for p in empty) + ")"
    return text


def _point_text(values: dict[str, Any], keys: list[str]) -> str:
    """A grid point as the verdicts name it: 'lr 0.003, weight_decay 0'."""
    return ", ".join(f"{k} {_num(values[k])}" for k in keys)


def _numeric(keys: list[str]) -> bool:
    try:
        [float(k) for k in keys]
    except ValueError:
        return False
    return True


def validation_band(point: GridPoint, name: str
                    ) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and 95% half-width over seeds of the validation curve ``name`` (e.g.
    ``val_accuracy``) of a grid point's runs: those that recorded it on the same steps as
    the first that did (runs stored before validation curves existed have none)."""
    curves = [r["curves"] for r in point.runs
              if isinstance(r["curves"].get(name), list) and r["curves"].get("val_step")]
    if not curves:
        return [], [], []
    steps = curves[0]["val_step"]
    columns = [c[name] for c in curves if c["val_step"] == steps and len(c[name]) == len(steps)]
    stats = [mean_ci(list(col)) for col in zip(*columns, strict=True)]
    return steps, [m for m, _ in stats], [h for _, h in stats]


def _band(ax: Any, label: str, steps: list[int], mean: list[float], half: list[float],
          marker: str | None = None) -> list[float]:
    """A mean line with its band (no band where the half-width is nan); the band's lower
    edge."""
    line, = ax.plot(steps, mean, label=_plain(label), marker=marker, markersize=3)
    low = [m - (0 if math.isnan(h) else h) for m, h in zip(mean, half, strict=True)]
    high = [m + (0 if math.isnan(h) else h) for m, h in zip(mean, half, strict=True)]
    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return low


def figures(summary: Summary) -> dict[str, bytes]:
    """PNG images: 'curves' (training loss, 95% bands), 'validation' (the validation metric
    during training, 95% bands; when the runs recorded it) and 'slices' (metric per slice
    with 95% error bars, and the baselines)."""
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
        low = _band(ax, c.label, steps, mean, half)
        positive = positive and min(low) > 0
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean, {LEVEL:.0%} band over seeds)")
    if positive and ax.lines:
        ax.set_yscale("log")
    ax.set_title(_plain(f"{summary.sweep}: training loss"))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out["curves"] = png(fig, plt)

    name = f"val_{summary.metric}"
    bands = {c.label: validation_band(c.chosen, name) for c in summary.contestants
             if c.chosen is not None}
    if any(steps for steps, _, _ in bands.values()):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for label, (steps, mean, half) in bands.items():
            if steps:
                _band(ax, label, steps, mean, half, marker="o")
        arrow = "higher" if summary.higher_is_better else "lower"
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {summary.metric} (mean, {LEVEL:.0%} band over seeds)")
        ax.set_title(_plain(f"{summary.sweep}: validation {summary.metric} ({arrow} is "
                            "better)"))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["validation"] = png(fig, plt)

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


def _html_image(name: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'


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
        seeds = summary.tuning_seeds
        lines.append("tuned per contestant on the validation split"
                     f"{'' if seeds is None else ' of ' + _seeds_named(seeds)} (never the "
                     "test): " + "; ".join(f"{k} in {v}" for k, v in grid.items())
                     + ("" if seeds is None else "; the chosen point then trained on the "
                        "other seeds"))
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
        ("Verdict", [("list", verdict_lines(summary))]),
        (f"{summary.slice_metric} per {summary.slice_axis} (mean ± 95% CI)",
         [("table", slice_rows(summary))] +
         ([("image", "slices")] if "slices" in images else [])),
        (f"Test {summary.metric} per seed (chosen configuration)",
         [("table", seed_rows(summary))]),
    ]
    if summary.grid_keys:
        sections.append(("Tuning grid (chosen: best mean validation metric)",
                         [("table", grid_rows(summary))]))
    if "validation" in images:
        sections.append((f"Training loss and validation {summary.metric} during training "
                         "(mean and 95% band over seeds)",
                         [("images", ["curves", "validation"])]))
    else:
        sections.append(("Training loss (mean and 95% band over seeds)",
                         [("image", "curves")]))
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
    being ("table", (header, rows)), ("list", lines), ("image", name in ``images``) or
    ("images", [names]: side by side in the page)."""
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
            elif kind == "image":
                md += [f"![{_md(heading)}]({content}.png)", ""]
                page.append(_html_image(content, images[content]))
            else:
                md += [f"![{_md(name)}]({name}.png)" for name in content] + [""]
                page.append("<div class='row'>" + "".join(
                    _html_image(name, images[name]) for name in content) + "</div>")
    md_path = out / "report.md"
    write_atomic(md_path, "\n".join(md))
    style = ("body{font-family:system-ui,sans-serif;max-width:1040px;margin:2em auto;"
             "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid "
             "#ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:"
             "left}img{max-width:100%}.row{display:flex;gap:1em}.row img{flex:1;min-width:0}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{style}</style></head><body>{''.join(page)}</body></html>")
    html_path = out / "report.html"
    write_atomic(html_path, doc)
    return md_path, html_path
