"""Sweep configuration: what to run, validated (an unknown key is an error that names it)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import attnlab.mechanisms  # noqa: F401  (registers the built-in mechanisms)
from attnlab.arena.files import DEFAULT_STORE, check_name
from attnlab.core.registry import info
from attnlab.models.blocks import hybrid_layers
from attnlab.tasks import make_task

MODEL_KEYS = ("dim", "depth", "heads", "head_dim", "positions", "mlp_ratio", "dropout",
              "tie_embeddings", "embed_std")
GRID_KEYS = ("lr", "weight_decay", "warmup", "batch_size", "grad_clip")  # may be lists


class ConfigError(ValueError):
    """A sweep configuration that cannot run; the message says which key and why."""


class Strict(BaseModel):
    """Unknown keys are errors, values keep their types ("3" is no count, true no number)
    and numbers are finite (lr = nan would train nothing and say so nowhere)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSettings(Strict):
    """``[model]`` (and a contestant's ``model``): each key typed and in range; the task's
    defaults fill the keys not given."""

    dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    positions: Literal["rope", "learned", "none"] | None = None
    mlp_ratio: int | None = Field(None, ge=0, description="0: attention-only blocks "
                                  "(no MLP, no second norm)")
    dropout: float | None = Field(None, ge=0, lt=1)
    tie_embeddings: bool | None = None
    embed_std: float | None = Field(None, gt=0)


def check_model_settings(value: dict[str, Any], who: str = "") -> dict[str, Any]:
    """``value`` unchanged, or ValueError naming the key, the value and what is accepted."""
    bad = sorted(set(value) - set(MODEL_KEYS))
    if bad:
        raise ValueError(f"{who}unknown model key {bad[0]!r} (known: {', '.join(MODEL_KEYS)})")
    try:
        ModelSettings.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"][:1])
        raise ValueError(f"{who}model key {key!r} = {value.get(key)!r}: {first['msg']}") \
            from None
    return value


class Variant(Strict):
    """One contestant: a mechanism, its keyword arguments and model overrides."""

    mechanism: str
    label: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    eval_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="mechanism arguments that replace ``kwargs`` for "
        "the evaluation only (the trained weights are loaded into the rebuilt model)")
    model: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or self.mechanism


class Supervise(Strict):
    """``[train.supervise]``: heads whose attention a loss pulls onto the task's targets."""

    heads: list[tuple[int, int]] = Field(min_length=1)
    weight: float = Field(0.1, ge=0)

    @field_validator("heads", mode="before")
    @classmethod
    def _pairs_as_tuples(cls, value: Any) -> Any:  # TOML and JSON have lists, no tuples
        return [tuple(v) if isinstance(v, list) else v for v in value] \
            if isinstance(value, list) else value


class Train(Strict):
    """The budget, the same for every contestant (None: the task's default).

    ``lr``, ``weight_decay``, ``warmup``, ``batch_size`` and ``grad_clip`` may be lists: each
    contestant then trains once per combination, and is represented by the combination with
    the best validation metric (mean over seeds), never chosen on the test.
    """

    steps: int | None = Field(None, gt=0)
    batch_size: int | list[int] | None = None
    lr: float | list[float] | None = None
    weight_decay: float | list[float] = 0.01
    warmup: float | list[float] = Field(0.05, description="fraction of steps")
    grad_clip: float | list[float] | None = 1.0
    curve_points: int = Field(60, gt=1, description="points of the stored loss curve")
    val_points: int | None = Field(
        None, ge=0, description="validation passes recorded during training (0: none; None: "
        "6 points at least 150 steps apart; the last is the final validation)")
    device: str = Field("auto", validate_default=True,
                        description="'auto' (cuda when available), 'cpu', 'cuda', "
                        "'cuda:N'; resolved when the config is read")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: forward passes under torch.autocast")
    compile: bool = Field(False, description="torch.compile the model for training")
    threads: int = Field(1, gt=0, description="torch threads of each run (part of the run "
                         "key: results do not depend on the number of workers)")
    supervise: Supervise | None = Field(
        None, description="attention supervision: heads = [[layer, head], ...] whose "
        "attention is pulled onto the task's target keys, weight = the loss's factor "
        "(tasks with attention_targets, e.g. mqar)")

    @field_validator("batch_size", "lr", "weight_decay", "warmup", "grad_clip")
    @classmethod
    def _grid_values(cls, value: Any, info: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError(f"a list of {info.field_name} values must be non-empty and "
                             f"distinct, got {value}")
        for v in values:
            if v is None:
                continue
            if info.field_name == "warmup" and not 0 <= v < 1:
                raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {v}")
            if info.field_name == "weight_decay" and v < 0:
                raise ValueError(f"weight_decay must be >= 0, got {v}")
            if info.field_name in ("batch_size", "lr", "grad_clip") and v <= 0:
                raise ValueError(f"{info.field_name} must be > 0, got {v}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str, info: ValidationInfo) -> str:
        import torch

        if info.context and info.context.get("stored"):
            return value  # resolved when the sweep ran; a report needs no CUDA

        if value == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(value)
        except RuntimeError as err:
            raise ValueError(f"not a device: {value!r} ({err})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {value!r}: CUDA is not available on this machine")
        return value

    def grid(self) -> dict[str, list[Any]]:
        """The keys given as lists, with their values."""
        return {k: getattr(self, k) for k in GRID_KEYS if isinstance(getattr(self, k), list)}


class Sweep(Strict):
    """task x contestants x seeds, trained with one budget; stored under ``store``."""

    task: str
    mechanisms: list[str | Variant] = Field(min_length=1)
    name: str | None = None
    task_params: dict[str, Any] = Field(default_factory=dict)
    seeds: int | list[int] | None = None  # None: the task's default_seeds
    tune_seeds: int | None = Field(None, gt=0, description=(
        "tune on the first N seeds only: every grid point trains on them, and each "
        "contestant's point best on validation over them then trains on the other seeds "
        "(None: every point on every seed)"))
    reference: str | None = None  # the contestant paired differences are taken to (default:
    # the first)
    model: dict[str, Any] = Field(default_factory=dict)
    train: Train = Field(default_factory=Train)
    workers: int | None = Field(None, gt=0)  # None: cores / train.threads
    store: str = DEFAULT_STORE

    @field_validator("mechanisms")
    @classmethod
    def _known_mechanisms(cls, value: list[str | Variant]) -> list[Variant]:
        variants = [Variant(mechanism=v) if isinstance(v, str) else v for v in value]
        for v in variants:
            for layer in hybrid_layers(v.mechanism):  # "softmax+linear": one per layer
                info(layer)  # ValueError naming the registered mechanisms
            check_model_settings(v.model, f"mechanism {v.name!r}: ")
        labels = [v.name for v in variants]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"two contestants are both labelled {dup[0]!r}; give each a "
                             "distinct label")
        return variants

    @field_validator("model")
    @classmethod
    def _known_model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_model_settings(value)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return value if value is None else check_name(value, "the sweep name")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int] | None) -> int | list[int] | None:
        if value is None:
            return value
        seeds = list(range(value)) if isinstance(value, int) else value
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a count >= 1 or distinct seeds >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _tune_seeds_within_seeds(self) -> Sweep:
        if self.tune_seeds is not None and self.tune_seeds > len(self.seed_list):
            raise ValueError(f"tune_seeds ({self.tune_seeds}) cannot exceed the number of "
                             f"seeds ({len(self.seed_list)})")
        return self

    @model_validator(mode="after")
    def _reference_is_a_contestant(self) -> Sweep:
        labels = [v.name for v in self.variants()]
        if self.reference is not None and self.reference not in labels:
            raise ValueError(f"reference {self.reference!r} is not a contestant; contestants: "
                             f"{', '.join(labels)}")
        return self

    @property
    def seed_list(self) -> list[int]:
        seeds = self.seeds
        if seeds is None:
            from attnlab.tasks import TASKS

            seeds = TASKS[self.task].default_seeds if self.task in TASKS else 3
        return list(range(seeds)) if isinstance(seeds, int) else list(seeds)

    @property
    def tuning_seeds(self) -> list[int]:
        """The seeds every grid point trains on (and the choice is made on)."""
        return self.seed_list[:self.tune_seeds]  # all when tune_seeds is None

    @property
    def staged(self) -> bool:
        """Whether the sweep runs in two stages: the grid on ``tuning_seeds``, then each
        contestant's chosen point on the other seeds."""
        return len(self.grid_points()) > 1 and len(self.tuning_seeds) < len(self.seed_list)

    @property
    def worker_count(self) -> int:
        """``workers``, or as many as the cores hold at ``train.threads`` each."""
        return self.workers or max(1, (os.cpu_count() or 1) // self.train.threads)

    @property
    def reference_label(self) -> str:
        return self.reference or self.variants()[0].name

    @property
    def sweep_name(self) -> str:
        return self.name or self.task

    def variants(self) -> list[Variant]:
        return list(cast("list[Variant]", self.mechanisms))  # normalised by the validator

    def grid_points(self) -> list[dict[str, Any]]:
        """One dict per combination of the list-valued train keys ([{}] without a grid)."""
        grid = self.train.grid()
        return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]

    def tuning_runs(self) -> list[RunSpec]:
        """The first stage: every grid point on the tuning seeds (every run if not staged)."""
        seeds = set(self.tuning_seeds) if self.staged else set(self.seed_list)
        return [s for s in self.runs() if s.seed in seeds]

    def confirming_runs(self, chosen: dict[str, dict[str, Any]]) -> list[RunSpec]:
        """The second stage: each contestant's chosen grid point (label -> {key: value}) on
        the seeds it was not tuned on; contestants missing from ``chosen`` get none."""
        if not self.staged:
            return []
        tuning = set(self.tuning_seeds)
        return [s for s in self.runs() if s.seed not in tuning and s.label in chosen
                and all(s.train[k] == v for k, v in chosen[s.label].items())]

    def runs(self) -> list[RunSpec]:
        """Every run the sweep may train (a staged sweep trains only some of the other seeds'
        runs), in the order they are started (seed-major)."""
        task = make_task(self.task, **self.task_params)
        given = {k: val for k, val in self.train.model_dump().items() if val is not None}
        specs = []
        for seed in self.seed_list:
            for v in self.variants():
                model = {**type(task).model_defaults, **self.model, **v.model}
                for point in self.grid_points():
                    train = {**type(task).train_defaults, **given, **point}
                    specs.append(RunSpec(self.sweep_name, self.task, task.params(), v.name,
                                         v.mechanism, dict(v.kwargs), model, train, seed,
                                         dict(v.eval_kwargs)))
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
    eval_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "task": self.task, "task_params": self.task_params,
                "label": self.label, "mechanism": self.mechanism, "kwargs": self.kwargs,
                "eval_kwargs": self.eval_kwargs, "model": self.model, "train": self.train,
                "seed": self.seed}

    @property
    def key(self) -> str:
        """Hash of everything that can change the run's numbers (the seed included)."""
        return digest(self.as_dict())

    @property
    def config_id(self) -> str:
        """Hash of the configuration without the seed: runs that may be pooled share it."""
        return digest({k: v for k, v in self.as_dict().items() if k != "seed"})


def digest(value: dict[str, Any]) -> str:
    blob = json.dumps(value, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_models(sweep: Sweep) -> None:
    """Build each contestant's model once, so bad task parameters or mechanism arguments
    fail before the sweep starts (not as failed runs)."""
    task = make_task(sweep.task, **sweep.task_params)
    seen = set()
    for spec in sweep.runs():
        if spec.label in seen:
            continue
        seen.add(spec.label)
        variants = [spec.kwargs] + ([{**spec.kwargs, **spec.eval_kwargs}] if spec.eval_kwargs
                                    else [])
        for kwargs in variants:
            try:
                task.build_model(spec.mechanism, kwargs, **spec.model)
            except (TypeError, ValueError) as err:
                raise ValueError(f"contestant {spec.label!r}: {err}") from None


def format_error(err: ValidationError, source: str) -> str:
    """Pydantic's errors as 'source: key.path: message (got VALUE)' lines. A key that may
    take one of several types (``lr``: a number or a list) gets one line, from the type its
    value has: 'train.lr.1: Input should be a finite number (got nan)', not one line per
    type it could have had."""
    lines: list[str]
    seen: set[str]
    lines, seen = [], set()
    errors = sorted(err.errors(), key=lambda e: -len(e["loc"]))  # the deepest of a union
    for e in errors:
        path = [str(p) for p in e["loc"] if not _union_branch(p)]
        where = ".".join(path)
        if where in seen or any(w.startswith(where + ".") for w in seen):
            continue
        seen.add(where)
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {where!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if isinstance(e.get("input"), (dict, list)) or "input" not in e \
                else f" (got {e['input']!r})"
            lines.append(f"{source}: {where or 'config'}: {msg}{got}")
    return "\n".join(reversed(lines))


def _union_branch(part: Any) -> bool:
    """Whether a pydantic error location part names a branch of a union ('float',
    'list[float]', 'int', 'Variant', 'function-after[...]'), not a key (all lower case) or
    an index."""
    return isinstance(part, str) and (part in ("int", "float", "str", "bool", "none")
                                      or "[" in part or part[:1].isupper())


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


def stored_sweep(data: dict[str, Any], source: str = "stored sweep") -> Sweep:
    """A sweep definition as the store kept it (validated when it ran): its device is not
    checked against this machine and its models are not built again."""
    try:
        return Sweep.model_validate(data, context={"stored": True})
    except ValidationError as err:
        raise ConfigError(format_error(err, source)) from None


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
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8): byte "
                          f"{err.object[err.start]:#04x} at offset {err.start}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None


def load_sweep(path: str | Path, **overrides: Any) -> Sweep:
    """A sweep from a TOML file; ``overrides`` (non-None values) replace top-level keys."""
    data = read_toml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_sweep(data, str(path))
