"""Sweep configuration: what to run, validated (an unknown key is an error that names it)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from attnlab.core.registry import info
from attnlab.tasks import make_task

MODEL_KEYS = ("dim", "depth", "heads", "head_dim", "positions", "mlp_ratio", "dropout")
DEFAULT_STORE = "attnlab-runs"


class ConfigError(ValueError):
    """A sweep configuration that cannot run; the message says which key and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(Strict):
    """One contestant: a mechanism, its keyword arguments and model overrides."""

    mechanism: str
    label: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or self.mechanism


class Train(Strict):
    """The budget, the same for every contestant (None: the task's default)."""

    steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps")
    grad_clip: float | None = Field(1.0, gt=0)
    curve_points: int = Field(60, gt=1, description="points of the stored loss curve")


class Sweep(Strict):
    """task x contestants x seeds, trained with one budget; stored under ``store``."""

    task: str
    mechanisms: list[str | Variant] = Field(min_length=1)
    name: str | None = None
    task_params: dict[str, Any] = Field(default_factory=dict)
    seeds: int | list[int] = 3
    model: dict[str, Any] = Field(default_factory=dict)
    train: Train = Field(default_factory=Train)
    workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), gt=0)
    store: str = DEFAULT_STORE

    @field_validator("mechanisms")
    @classmethod
    def _known_mechanisms(cls, value: list[str | Variant]) -> list[Variant]:
        variants = [Variant(mechanism=v) if isinstance(v, str) else v for v in value]
        for v in variants:
            info(v.mechanism)  # ValueError naming the registered mechanisms
            bad = sorted(set(v.model) - set(MODEL_KEYS))
            if bad:
                raise ValueError(f"mechanism {v.name!r}: unknown model key {bad[0]!r} "
                                 f"(known: {', '.join(MODEL_KEYS)})")
        labels = [v.name for v in variants]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"two contestants are both labelled {dup[0]!r}; give each a "
                             "distinct label")
        return variants

    @field_validator("model")
    @classmethod
    def _known_model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(value) - set(MODEL_KEYS))
        if bad:
            raise ValueError(f"unknown model key {bad[0]!r} (known: {', '.join(MODEL_KEYS)})")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        seeds = list(range(value)) if isinstance(value, int) else value
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a count >= 1 or distinct seeds >= 0, got {value}")
        return value

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def sweep_name(self) -> str:
        return self.name or self.task

    def variants(self) -> list[Variant]:
        return list(self.mechanisms)  # type: ignore[arg-type]  (normalised by the validator)

    def runs(self) -> list[RunSpec]:
        """Every run of the sweep, in the order they are started (seed-major)."""
        task = make_task(self.task, **self.task_params)
        specs = []
        for seed in self.seed_list:
            for v in self.variants():
                train = {**type(task).train_defaults,
                         **{k: val for k, val in self.train.model_dump().items()
                            if val is not None}}
                model = {**type(task).model_defaults, **self.model, **v.model}
                specs.append(RunSpec(self.sweep_name, self.task, task.params(), v.name,
                                     v.mechanism, dict(v.kwargs), model, train, seed))
        return specs


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run; ``key`` identifies it in the store."""

    sweep: str
    task: str
    task_params: dict[str, Any]
    label: str
    mechanism: str
    kwargs: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "task": self.task, "task_params": self.task_params,
                "label": self.label, "mechanism": self.mechanism, "kwargs": self.kwargs,
                "model": self.model, "train": self.train, "seed": self.seed}

    @property
    def key(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_models(sweep: Sweep) -> None:
    """Build each contestant's model once, so bad task parameters or mechanism arguments
    fail before the sweep starts (not as failed runs)."""
    task = make_task(sweep.task, **sweep.task_params)
    for spec in sweep.runs()[:len(sweep.variants())]:
        try:
            task.build_model(spec.mechanism, spec.kwargs, **spec.model)
        except (TypeError, ValueError) as err:
            raise ValueError(f"contestant {spec.label!r}: {err}") from None


def format_error(err: ValidationError, source: str) -> str:
    """Pydantic's errors as 'source: key.path: message' lines."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {where!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {where or 'config'}: {msg}")
    return "\n".join(lines)


def parse_sweep(data: dict[str, Any], source: str = "config") -> Sweep:
    """A validated Sweep; raises ConfigError naming the offending key."""
    try:
        sweep = Sweep.model_validate(data)
        check_models(sweep)
    except ValidationError as err:
        raise ConfigError(format_error(err, source)) from None
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    return sweep


def toml_module():
    """tomllib (Python >= 3.11) or its backport tomli."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def read_toml(path: str | Path) -> dict[str, Any]:
    """The raw contents of a sweep file (not validated yet)."""
    path = Path(path)
    if path.suffix != ".toml":
        raise ConfigError(f"{path}: sweep configs are TOML files (*.toml)")
    tomllib = toml_module()
    try:
        return tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None


def load_sweep(path: str | Path, **overrides: Any) -> Sweep:
    """A sweep from a TOML file; ``overrides`` (non-None values) replace top-level keys."""
    data = read_toml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_sweep(data, str(path))
