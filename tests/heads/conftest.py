"""Fixtures shared by the tests of ``attnlab.heads``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def induction_sweep(tmp_path: Path) -> Callable[[int], Path]:
    """A function training the smallest sweep of the induction tests for ``steps`` steps:
    sweep ``ind``, softmax, two seeds, a two-layer attention-only model of two heads on
    induction (vocab 24, length 24, segments of 4); returns its run store
    (``tmp_path / "runs"``)."""

    def train(steps: int) -> Path:
        from attnlab.arena.config import parse_sweep
        from attnlab.arena.sweep import run_sweep

        store = tmp_path / "runs"
        run_sweep(parse_sweep({
            "name": "ind", "task": "induction", "seeds": 2, "workers": 1,
            "store": str(store), "mechanisms": ["softmax"],
            "task_params": {"vocab": 24, "length": 24, "segment": 4},
            "model": {"dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 0},
            "train": {"steps": steps, "batch_size": 32, "lr": 3e-3}}))
        return store

    return train
