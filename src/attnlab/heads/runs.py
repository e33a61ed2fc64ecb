"""Open a trained arena run: its model rebuilt from the stored configuration, with the
weights the run saved (``<store>/models/<key>.safetensors``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["LoadedRun", "load_run", "saved_runs"]


@dataclass
class LoadedRun:
    """``model`` (eval mode, CPU), ``task`` (the run's task, to make data and evaluate) and
    ``row`` (the stored run: key, label, mechanism, seed, config, metrics, ...)."""

    model: nn.Module
    task: Any
    row: dict[str, Any]

    @property
    def key(self) -> str:
        return self.row["key"]


def load_run(store: str | Path, key: str) -> LoadedRun:
    """The run of ``store`` whose key is ``key`` or starts with it. KeyError for no or an
    ambiguous key; FileNotFoundError when the run kept no weights (a failed run, or one
    trained by an attnlab that did not save them)."""
    from safetensors.torch import load_file

    from attnlab.arena.store import DB_NAME, RunStore
    from attnlab.tasks import make_task

    if not (Path(store) / DB_NAME).exists():
        raise FileNotFoundError(f"no result store at {store}/")
    with RunStore(store, readonly=True) as db:
        row = db.find(key)
        path = db.model_path(row["key"])
    if not path.exists():
        why = "it failed" if row["status"] == "failed" else \
            "it was trained before attnlab kept models; run it again to keep one"
        raise FileNotFoundError(f"run {row['key']} ({row['label']} seed {row['seed']}) has "
                                f"no saved model at {path}: {why}")
    spec = row["config"]
    task = make_task(spec["task"], **spec["task_params"])
    model = task.build_model(spec["mechanism"], {**spec["kwargs"], **spec.get("eval_kwargs",
                                                                             {})},
                             **spec["model"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return LoadedRun(model.eval(), task, row)


def saved_runs(store: str | Path, sweep: str) -> list[dict[str, Any]]:
    """The finished runs of ``sweep`` in ``store`` that kept their weights (oldest first)."""
    from attnlab.arena.store import RunStore

    with RunStore(store, readonly=True) as db:
        return [r for r in db.rows(sweep) if r["status"] == "done"
                and db.model_path(r["key"]).exists()]
