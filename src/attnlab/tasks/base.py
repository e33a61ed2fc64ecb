"""What a task is: seeded batches, a loss, metrics per slice and closed-form baselines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

TASKS: dict[str, type[Task]] = {}

# val: chooses hyper-parameters (never the test); fit: data a baseline may tune constants on
SPLITS = ("train", "val", "test", "fit")
EVAL_SPLITS = ("val", "test")
TRAIN_OFFSET = 1 << 20  # train streams start here; the fixed streams stay below it


def split_generator(seed: int, split: str, stream: int = 0) -> torch.Generator:
    """A generator for ``split``; no two (split, seed, stream) share a generator seed.

    ``train`` depends on the run seed (2^20 + seed): each seed trains on its own data.
    ``val``, ``test`` and ``fit`` do not: every seed and every contestant of a sweep is
    scored on the same episodes, so test noise is not counted as seed noise and paired
    differences compare like with like. ``stream`` numbers independent fixed streams of one
    split (e.g. one per context length).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0 or seed >= TRAIN_OFFSET:
        raise ValueError(f"seed must be in [0, {TRAIN_OFFSET}), got {seed}")
    if not 0 <= stream < TRAIN_OFFSET // 4:
        raise ValueError(f"stream must be in [0, {TRAIN_OFFSET // 4}), got {stream}")
    if split == "train":
        return torch.Generator().manual_seed(TRAIN_OFFSET + seed + stream * TRAIN_OFFSET)
    return torch.Generator().manual_seed(4 * stream + SPLITS.index(split))


def check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split must be one of {EVAL_SPLITS}, got {split!r}")


@dataclass
class Evaluation:
    """A trained model's test results.

    ``metrics``: name -> value (the task's primary metric among them). ``slices``: the
    primary metric per slice value, e.g. {"10": 0.4, "20": 0.2} for context lengths.
    ``baselines``: closed-form predictors' metric per slice value, on the same test data.
    """

    metrics: dict[str, float]
    slices: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


class Task:
    """A task of the arena; subclasses are dataclasses whose fields are their parameters.

    Class attributes: ``name``; ``metric`` (the primary test metric) and
    ``higher_is_better``; ``slice_axis`` (what the slices are, e.g. "kv pairs") and
    ``slice_metric`` (the metric they hold, when it is not ``metric``);
    ``model_defaults`` and ``train_defaults`` (the budget every mechanism gets unless the
    sweep says otherwise); ``description``.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    slice_axis: ClassVar[str]
    slice_metric: ClassVar[str | None] = None  # what the slices hold (default: metric)
    table_metrics: ClassVar[tuple[str, ...] | None] = None  # report columns (default: 3 first)
    description: ClassVar[str]
    model_defaults: ClassVar[dict[str, Any]] = {"dim": 64, "depth": 2, "heads": 4}
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 300, "batch_size": 32, "lr": 3e-3}
    default_seeds: ClassVar[int] = 5  # seeds of a sweep that does not say

    def build_model(self, mechanism: str, mechanism_kwargs: dict, **model: Any) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Training loss of a batch (without the model's extra loss)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str = "test") -> Evaluation:
        """Metrics of a trained model on the fixed ``split`` ("val" or "test")."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def make_task(name: str, **params: Any) -> Task:
    """The task ``name`` with its parameters; unknown names and parameters are errors."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"task {name!r} has no parameter {unknown[0]!r}; its parameters: "
                         f"{', '.join(sorted(known)) or 'none'}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: _typed(name, k, v, defaults[k]) for k, v in params.items()})


def parameter_text(value: Any) -> str:
    """A parameter value as ``--param`` and TOML write it (a tuple is a list: [1, 2])."""
    if isinstance(value, tuple | list):
        return "[" + ", ".join(parameter_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _typed(task: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the parameter's default, or a ValueError naming both."""
    def wrong() -> ValueError:
        return ValueError(f"task {task!r}: parameter {key} must be like its default "
                          f"{parameter_text(default)}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong()
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                int(value) != value:
            raise wrong()
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong()
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise wrong()
        inner = default[0] if default else None
        return tuple(v if inner is None else _typed(task, key, v, inner) for v in value)
    if isinstance(default, str) and not isinstance(value, str):
        raise wrong()
    return value


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_positive(task: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"{task}: {key} must be > 0, got {value}")
