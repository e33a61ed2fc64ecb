"""Optional experiment loggers: each finished run of a sweep, as the store records it, sent
to TensorBoard or Weights & Biases as well.

The store stays the source of truth: a logger receives a run when it ends (with the curves
and metrics the store keeps) and writes a copy; a logger's failure is reported and the
sweep goes on. Both are extras, imported only when asked for: ``pip install
'attnlab[tensorboard]'`` and ``pip install 'attnlab[wandb]'``. W&B runs offline (no
network, no account) with ``WANDB_MODE=offline``; ``wandb sync`` uploads them later.

Scalars, at each recorded step: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``val/<metric>``; at the last step the final test metrics as ``test/<metric>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from attnlab.arena.store import curve_points

LOGGERS = ("tensorboard", "wandb")
DEFAULT_PROJECT = "attnlab-arena"
HINTS = {"tensorboard": "pip install 'attnlab[tensorboard]'",
         "wandb": "pip install 'attnlab[wandb]'"}


class LoggerError(Exception):
    """A logger that cannot be used (its package is missing); the message says what to do."""


def run_row(spec: Any, result: dict[str, Any]) -> dict[str, Any]:
    """A run as the store would return it (``RunStore.rows()``), from its ``RunSpec`` and
    the trainer's result: what a logger receives."""
    return {"key": spec.key, "sweep": spec.sweep, "task": spec.task, "label": spec.label,
            "mechanism": spec.mechanism, "seed": spec.seed, "status": result["status"],
            "config": spec.as_dict(), "metrics": result.get("metrics") or {},
            "curves": result.get("curves") or {}, "wall_time": result.get("wall_time")}


def scalar_tag(name: str) -> str:
    """The logged name of a curve: train_loss -> train/loss, lr -> train/lr, grad_norm ->
    train/grad_norm, val_accuracy -> val/accuracy."""
    if name == "train_loss":
        return "train/loss"
    if name.startswith("val_"):
        return f"val/{name[4:]}"
    return f"train/{name}"


def scalars(row: dict[str, Any]) -> dict[int, dict[str, float]]:
    """step -> {tag: value} of a stored run: its curves, and its final test metrics at the
    last step (the validation metric is the last point of its curve)."""
    out: dict[int, dict[str, float]] = {}
    for name, step, value in curve_points(row.get("curves") or {}):
        out.setdefault(step, {})[scalar_tag(name)] = float(value)
    last = max(out, default=row["config"].get("train", {}).get("steps", 0))
    for name, value in (row.get("metrics") or {}).items():
        if not name.startswith("val_") and isinstance(value, int | float) \
                and not isinstance(value, bool):
            out.setdefault(last, {})[f"test/{name}"] = float(value)
    return dict(sorted(out.items()))


def run_name(row: dict[str, Any]) -> str:
    """'<label>-seed<seed>-<key prefix>', safe as one folder name."""
    label = re.sub(r"[^A-Za-z0-9_.+=-]+", "_", str(row["label"])).strip("._") or "run"
    return f"{label}-seed{row['seed']}-{row['key'][:8]}"


class RunLogger:
    """What the sweep calls: ``log(row)`` once per finished run, ``close()`` at the end."""

    kind = ""

    def log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing stays open between runs by default."""


def require(kind: str) -> None:
    """LoggerError naming the install command when ``kind``'s package is missing."""
    if kind not in LOGGERS:
        raise LoggerError(f"unknown logger {kind!r}; loggers: {', '.join(LOGGERS)}")
    try:
        if kind == "tensorboard":
            import tensorboard  # noqa: F401  (torch's SummaryWriter needs it)
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        else:
            import wandb  # noqa: F401
    except ImportError as err:
        raise LoggerError(f"--log {kind} needs the {kind} package ({err}): "
                          f"{HINTS[kind]}") from None


class TensorBoardLogger(RunLogger):
    """One event-file folder per run: ``<log_dir>/<sweep>/<label>-seed<seed>-<key>``
    (``tensorboard --logdir <log_dir>`` shows every sweep)."""

    kind = "tensorboard"

    def __init__(self, log_dir: str | Path) -> None:
        require("tensorboard")
        self.log_dir = Path(log_dir)

    def log(self, row: dict[str, Any]) -> None:
        if row["status"] != "done":
            return
        from torch.utils.tensorboard import SummaryWriter

        folder = self.log_dir / re.sub(r"[^A-Za-z0-9_.+=-]+", "_", row["sweep"]) / run_name(row)
        writer = SummaryWriter(log_dir=str(folder))
        try:
            for step, values in scalars(row).items():
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)
            writer.add_text("config", f"```\n{json.dumps(row['config'], indent=1)}\n```")
        finally:
            writer.close()


class WandbLogger(RunLogger):
    """One W&B run per arena run, in ``project`` (grouped by sweep, named '<label> seed
    <seed>', the run's configuration as its config), files under ``log_dir``. ``mode``:
    "offline", "online" or None (W&B's own default: ``WANDB_MODE``, else online)."""

    kind = "wandb"

    def __init__(self, log_dir: str | Path, project: str = DEFAULT_PROJECT,
                 mode: Literal["online", "offline", "disabled"] | None = None) -> None:
        require("wandb")
        self.log_dir, self.project, self.mode = Path(log_dir), project, mode

    def log(self, row: dict[str, Any]) -> None:
        if row["status"] != "done":
            return
        import wandb

        self.log_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, dir=str(self.log_dir), mode=self.mode,
                         name=f"{row['label']} seed {row['seed']}", group=row["sweep"],
                         job_type=row["task"], config={**row["config"], "key": row["key"]},
                         tags=[row["task"], row["mechanism"]],
                         settings=wandb.Settings(console="off", silent=True))
        try:
            for step, values in scalars(row).items():
                run.log(values, step=step)
        finally:
            run.finish()


def make_loggers(kinds: list[str] | tuple[str, ...], log_dir: str | Path,
                 project: str = DEFAULT_PROJECT) -> list[RunLogger]:
    """The loggers named in ``kinds`` (each once), writing under ``log_dir``; LoggerError
    for an unknown name or a missing package, before anything runs."""
    out: list[RunLogger] = []
    for kind in dict.fromkeys(kinds):
        if kind == "tensorboard":
            out.append(TensorBoardLogger(Path(log_dir) / "tensorboard"))
        elif kind == "wandb":
            out.append(WandbLogger(log_dir, project))
        else:
            require(kind)  # raises, naming the known loggers
    return out
