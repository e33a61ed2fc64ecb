"""What a task is: seeded batches, a loss, metrics per slice and closed-form baselines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

TASKS: dict[str, type[Task]] = {}

SPLITS = ("train", "test", "fit")  # fit: data a baseline may tune its constants on


def split_generator(seed: int, split: str) -> torch.Generator:
    """A generator for ``split`` of run ``seed``; the three splits never share a seed.

    Seeds are 3 * seed + {0, 1, 2}: train, test and baseline-fitting streams are disjoint
    for every run seed, and test data is the same for every mechanism of a sweep.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return torch.Generator().manual_seed(3 * seed + SPLITS.index(split))


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

    def build_model(self, mechanism: str, mechanism_kwargs: dict, **model: Any) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Training loss of a batch (without the model's extra loss)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
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
    return cls(**params)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_positive(task: str, **values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"{task}: {key} must be > 0, got {value}")
