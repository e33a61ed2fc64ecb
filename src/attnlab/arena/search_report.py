"""The report of an architecture search: every trained design with its metric and cost, the
Pareto front (Optuna's non-dominated trials), whether mixed designs sit on it, and a plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.arena.files import write_atomic
from attnlab.arena.report import Section, png, write_document
from attnlab.arena.search import COSTS, Design, design_of

COST_UNITS = dict(zip(COSTS, ("parameters", "forward FLOPs per sequence",
                               "forward ms per sequence"), strict=True))


@dataclass
class Point:
    design: Design
    metric: float
    cost: float
    trials: list[int]
    on_front: bool = False


def points(study: Any) -> list[Point]:
    """One point per design trained to completion (a design asked twice has the same runs,
    so the same values), in order of cost; ``on_front``: among Optuna's best trials."""
    from optuna.trial import TrialState

    front = {t.number for t in study.best_trials}
    by_design: dict[Design, Point] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        design = design_of(t.params)
        point = by_design.setdefault(design, Point(design, t.values[0], t.values[1], []))
        point.trials.append(t.number)
        point.on_front |= t.number in front
    return sorted(by_design.values(), key=lambda p: (p.cost, p.design.label))


def verdict(pts: list[Point], metric: str) -> list[str]:
    front = [p for p in pts if p.on_front]
    mixed = [p for p in front if p.design.mixed]
    lines = [f"{len(pts)} designs trained; {len(front)} on the Pareto front of {metric} "
             "against cost."]
    if mixed:
        lines.append(f"Mixed designs on the front: {len(mixed)} of {len(front)} ("
                     + "; ".join(p.design.label for p in mixed) + ").")
    else:
        lines.append("No mixed design is on the front.")
    return lines


def _fmt_cost(value: float, cost: str) -> str:
    return f"{value:.3g}" if cost == "latency" else f"{value:,.0f}"


def table(pts: list[Point], metric: str, cost: str) -> tuple[list[str], list[list[str]]]:
    header = ["design", "layers", "dim", "heads", metric, COST_UNITS[cost], "front"]
    rows = [[p.design.label, p.design.mechanism, str(p.design.dim), str(p.design.heads),
             f"{p.metric:.4g}", _fmt_cost(p.cost, cost), "yes" if p.on_front else ""]
            for p in pts]
    return header, rows


def figure(pts: list[Point], metric: str, cost: str, higher_is_better: bool) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    kinds: dict[str, list[Point]] = {}
    for p in pts:
        kinds.setdefault("mixed" if p.design.mixed else p.design.layers[0], []).append(p)
    for kind, group in sorted(kinds.items()):
        ax.scatter([p.cost for p in group], [p.metric for p in group], label=kind,
                   marker="^" if kind == "mixed" else "o", alpha=0.75)
    front = sorted((p for p in pts if p.on_front), key=lambda p: p.cost)
    ax.step([p.cost for p in front], [p.metric for p in front], where="post", color="k",
            lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(COST_UNITS[cost])
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.legend(fontsize=8)
    return png(fig, plt)


def write_search_report(study: Any, out_dir: str | Path, *, metric: str,
                        higher_is_better: bool, cost: str, setup: list[str]) -> Path:
    """``report.md``, ``report.html``, ``front.png`` and ``trials.json`` in ``out_dir``."""
    pts = points(study)
    if not pts:
        raise ValueError("no design of this search has finished training")
    out = Path(out_dir)
    images = {"front": figure(pts, metric, cost, higher_is_better)}
    front = [p for p in pts if p.on_front]
    sections: list[Section] = [
        ("Verdict", [("list", verdict(pts, metric))]),
        ("Pareto front", [("table", table(front, metric, cost)), ("image", "front")]),
        ("Every design trained", [("table", table(pts, metric, cost))]),
    ]
    md, _ = write_document(out, f"Architecture search: {study.study_name}", setup, sections,
                           images)
    trials = [{"number": t.number, "state": t.state.name, "params": t.params,
               "values": t.values, "design": t.user_attrs.get("design"),
               "cost": t.user_attrs.get("cost")} for t in study.get_trials(deepcopy=False)]
    write_atomic(out / "trials.json", json.dumps(trials, indent=1))
    return md
