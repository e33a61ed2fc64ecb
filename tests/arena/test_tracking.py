"""Experiment tracking: validation curves, learning rate and gradient norm recorded on a
schedule without changing a run's numbers."""

import json
import math
from dataclasses import replace

import pytest

from attnlab.arena.config import parse_sweep
from attnlab.arena.trainer import (
    TRAIN_CURVES,
    learning_rate,
    train_run,
    validation_interval,
)

# dropout: a validation pass that consumed the global random state, or left the model in
# evaluation mode, would change every later training step's dropout masks
TINY = {"task": "markov", "task_params": {"states": 3, "length": 24}, "seeds": 1,
        "model": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.1},
        "train": {"steps": 6, "batch_size": 4, "curve_points": 3, "lr": 3e-3}}


def spec_with(val_points, **variant):
    mechanism = {"mechanism": "softmax", **variant}
    spec = parse_sweep({**TINY, "mechanisms": [mechanism]}).runs()[0]
    return replace(spec, train={**spec.train, "val_points": val_points})


REBUILT = {"mechanism": "softplus", "label": "lssa-as-lssar", "kwargs": {"reweight_p": 0},
           "eval_kwargs": {"reweight_p": 15}}


@pytest.mark.parametrize("variant", [{}, REBUILT], ids=["plain", "eval_kwargs"])
def test_validation_passes_leave_the_run_bit_identical(variant):
    """Every step validated vs none: the same weights, metrics and training curves (the
    eval_kwargs case rebuilds a model for each pass, which draws a fresh initialisation)."""
    without, every_step = train_run(spec_with(0, **variant)), train_run(spec_with(6, **variant))
    assert without["status"] == every_step["status"] == "done", every_step["error"]
    assert every_step["model"] == without["model"]  # the safetensors bytes
    assert every_step["metrics"] == without["metrics"]
    for name in ("step", *TRAIN_CURVES):
        assert every_step["curves"][name] == without["curves"][name], name
    assert "val_step" not in without["curves"]
    assert every_step["curves"]["val_step"] == [1, 2, 3, 4, 5, 6]
    val = every_step["curves"]["val_loss"]
    assert len(set(val)) > 1  # passes on a model that trains, not one copy
    # the last point is the run's final validation
    assert val[-1] == every_step["metrics"]["val_loss"]


def test_curves_hold_the_learning_rate_and_gradient_norm_on_the_loss_curves_steps():
    result = train_run(spec_with(10))
    curves = result["curves"]
    assert curves["step"] == [2, 4, 6]
    assert curves["lr"] == [learning_rate(s - 1, 6, 3e-3, 0.05) for s in curves["step"]]
    assert all(math.isfinite(g) and g > 0 for g in curves["grad_norm"])
    assert curves["val_step"] == [1, 2, 3, 4, 5, 6]  # 10 points asked, 6 steps
    assert {"val_loss", "val_accuracy"} <= set(curves)
    assert "val_bayes_loss" not in curves  # a baseline's metric: constant, not a curve
    json.dumps(curves, allow_nan=False)  # the store's JSON column


def test_validation_schedule():
    assert validation_interval(1200, 10) == 120
    assert validation_interval(1200, None) == 150  # the default: 8 points
    assert validation_interval(600, None) == 100  # at least 100 steps apart
    assert validation_interval(6, None) == 100  # a tiny run: the final validation only
    assert validation_interval(6, 10) == 1
    assert validation_interval(100, 0) == 0
    with pytest.raises(ValueError, match="val_points"):
        validation_interval(100, -1)
