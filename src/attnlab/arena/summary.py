"""A sweep's runs aggregated: contestants, their tuning grid, the chosen grid point (best on
validation), mean ± 95% CI over seeds and paired differences to a reference contestant."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from attnlab.arena.config import Sweep, digest
from attnlab.arena.stats import Paired, mean_ci, paired_difference
from attnlab.tasks import TASKS


@dataclass
class GridPoint:
    """One contestant at one value of the tuned train keys, over seeds."""

    values: dict[str, Any]             # e.g. {"lr": 0.001}; {} without a grid
    runs: list[dict[str, Any]]         # done runs
    failed: list[dict[str, Any]]
    val: tuple[float, float]           # validation metric, mean ± half-width (over the
    # tuning seeds when the sweep tuned on some seeds only)

    def per_seed(self, metric: str) -> dict[int, float]:
        return {r["seed"]: r["metrics"][metric] for r in self.runs if metric in r["metrics"]}


@dataclass
class Contestant:
    label: str
    mechanism: str
    points: list[GridPoint]
    chosen: GridPoint | None = None            # best validation metric (None: nothing done)
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # of the chosen
    slices: dict[str, tuple[float, float]] = field(default_factory=dict)
    paired: Paired | None = None               # chosen test metric - the reference's
    params: int | None = None
    wall_time: float = math.nan
    kwargs: dict[str, Any] = field(default_factory=dict)       # mechanism arguments
    eval_kwargs: dict[str, Any] = field(default_factory=dict)  # ... replaced at evaluation
    model: dict[str, Any] = field(default_factory=dict)        # the model's settings


@dataclass
class Summary:
    """Aggregates of one sweep configuration (contestants in the configuration's order)."""

    sweep: str
    task: str
    metric: str
    higher_is_better: bool
    slice_axis: str
    slice_metric: str
    description: str
    grid_keys: list[str]
    reference: str
    contestants: list[Contestant]
    baselines: dict[str, dict[str, float]]   # baseline -> slice value -> value
    rows: list[dict[str, Any]]
    tuning_seeds: list[int] | None = None  # the seeds the choice was made on (None: all)

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.contestants]

    def contestant(self, label: str) -> Contestant:
        return next(c for c in self.contestants if c.label == label)

    @property
    def config(self) -> dict[str, Any]:
        return self.rows[0]["config"]

    def better(self, difference: float) -> bool:
        return difference > 0 if self.higher_is_better else difference < 0


def fixed_part(row: dict[str, Any], grid_keys: list[str]) -> str:
    """Hash of a run's configuration without its seed and tuned keys."""
    config = {k: v for k, v in row["config"].items()
              if k not in ("seed", "machine", "provenance")}
    config["train"] = {k: v for k, v in config.get("train", {}).items() if k not in grid_keys}
    return digest(config)


def summarize(rows: list[dict[str, Any]], grid_keys: list[str] | tuple[str, ...] = (),
              reference: str | None = None, tuning_seeds: list[int] | None = None
              ) -> Summary:
    """Aggregate one sweep configuration's rows (as ``RunStore.rows`` returns them).

    Rows of one contestant must differ only in their seed and the ``grid_keys``: runs of
    different configurations are never pooled (a ValueError says which contestant).
    ``tuning_seeds``: the grid point is chosen on the validation metric of these seeds only
    (a sweep with ``tune_seeds``, whose chosen point also ran on other seeds); its test
    metrics are then over every seed it ran on.
    """
    if not rows:
        raise ValueError("no runs to report")
    grid_keys = list(grid_keys)
    task = rows[0]["task"]
    cls = TASKS[task]
    val_key = f"val_{cls.metric}"
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    contestants = []
    for label, runs in by_label.items():
        if len({fixed_part(r, grid_keys) for r in runs}) > 1:
            raise ValueError(f"contestant {label!r} has runs of different configurations; "
                             "a report pools runs of one configuration only")
        points: dict[tuple, list[dict]] = defaultdict(list)
        for r in runs:
            train = r["config"].get("train", {})
            points[tuple(train.get(k) for k in grid_keys)].append(r)
        grid = []
        for values, point_runs in points.items():
            done = [r for r in point_runs if r["status"] == "done"]
            tuned = [r for r in done if tuning_seeds is None or r["seed"] in tuning_seeds]
            grid.append(GridPoint(dict(zip(grid_keys, values, strict=True)), done,
                                  [r for r in point_runs if r["status"] != "done"],
                                  mean_ci([r["metrics"].get(val_key) for r in tuned])))
        grid.sort(key=lambda p: tuple(str(v) for v in p.values.values()))
        config = runs[0]["config"]
        contestant = Contestant(label, runs[0]["mechanism"], grid,
                                kwargs=dict(config.get("kwargs") or {}),
                                eval_kwargs=dict(config.get("eval_kwargs") or {}),
                                model=dict(config.get("model") or {}))
        contestants.append(_choose(contestant, cls.higher_is_better))
    reference = reference or contestants[0].label
    if reference not in by_label:
        raise ValueError(f"reference {reference!r} is not a contestant; contestants: "
                         f"{', '.join(by_label)}")
    ref = next(c for c in contestants if c.label == reference)
    for c in contestants:
        if c is not ref and c.chosen is not None and ref.chosen is not None:
            c.paired = paired_difference(c.chosen.per_seed(cls.metric),
                                         ref.chosen.per_seed(cls.metric))
    baselines: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for name, values in (r["baselines"] if r["status"] == "done" else {}).items():
            for k, v in values.items():
                baselines[name][k].append(v)
    return Summary(rows[0]["sweep"], task, cls.metric, cls.higher_is_better, cls.slice_axis,
                   cls.slice_metric or cls.metric, cls.description, grid_keys, reference,
                   contestants,
                   {n: {k: sum(v) / len(v) for k, v in vals.items()}
                    for n, vals in baselines.items()}, rows,
                   None if tuning_seeds is None else sorted(tuning_seeds))


def summarize_sweep(rows: list[dict[str, Any]], sweep: Sweep) -> Summary:
    """:func:`summarize` with the sweep's grid, reference and tuning seeds."""
    return summarize(rows, list(sweep.train.grid()), sweep.reference_label,
                     sweep.tuning_seeds if sweep.staged else None)


def _choose(c: Contestant, higher_is_better: bool) -> Contestant:
    """The grid point with the best mean validation metric, and its test aggregates."""
    candidates = [p for p in c.points if p.runs]
    if not candidates:
        return c
    sign = -1 if higher_is_better else 1

    def key(p: GridPoint) -> float:
        return math.inf if math.isnan(p.val[0]) else sign * p.val[0]

    chosen = c.chosen = min(candidates, key=key)
    done = chosen.runs
    names = list(dict.fromkeys(k for r in done for k in r["metrics"]))
    c.metrics = {k: mean_ci([r["metrics"].get(k) for r in done]) for k in names}
    keys = list(dict.fromkeys(k for r in done for k in r["slices"]))
    c.slices = {k: mean_ci([r["slices"].get(k) for r in done]) for k in keys}
    c.params = done[0]["params"]
    c.wall_time = mean_ci([r["wall_time"] for r in done])[0]
    return c


def curve_band(point: GridPoint) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean training loss and the 95% half-width over seeds (runs of equal length)."""
    if not point.runs:
        return [], [], []
    steps = point.runs[0]["curves"]["step"]
    losses = [r["curves"]["train_loss"] for r in point.runs if r["curves"].get("step") == steps]
    stats = [mean_ci(list(col)) for col in zip(*losses, strict=True)]
    return steps, [m for m, _ in stats], [h for _, h in stats]
