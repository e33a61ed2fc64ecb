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
    curves = every_step["curves"]
    assert curves["step"] == [2, 4, 6]  # lr and gradient norm on the loss curve's steps
    assert curves["lr"] == [learning_rate(s - 1, 6, 3e-3, 0.05) for s in curves["step"]]
    assert all(math.isfinite(g) and g > 0 for g in curves["grad_norm"])
    assert "val_accuracy" in curves
    assert "val_bayes_loss" not in curves  # a baseline's metric: constant, not a curve
    json.dumps(curves, allow_nan=False)  # the store's JSON column


def test_validation_schedule():
    assert validation_interval(1200, 10) == 120
    assert validation_interval(1200, None) == 200  # the default: 6 points
    assert validation_interval(600, None) == 150  # at least 150 steps apart
    assert validation_interval(6, None) == 150  # a tiny run: the final validation only
    assert validation_interval(6, 10) == 1
    assert validation_interval(100, 0) == 0
    with pytest.raises(ValueError, match="val_points"):
        validation_interval(100, -1)


def test_the_report_shows_validation_curves_next_to_the_training_loss(tmp_path):
    from attnlab.arena.report import summarize, validation_band, write_report

    def row(label, seed, val, steps=(50, 100)):
        return {"sweep": "s", "task": "icl_regression", "label": label,
                "mechanism": "softmax", "seed": seed, "status": "done", "params": 100,
                "wall_time": 2.0, "finished": 1.7e9 + seed, "error": None,
                "config": {"task_params": {"d": 5}, "model": {}, "label": label,
                           "train": {"steps": 100, "lr": 0.01}},
                "metrics": {"mse": val[-1], "val_mse": val[-1]}, "slices": {},
                "baselines": {},
                "curves": {"step": [50, 100], "train_loss": [1.0, 0.5], "lr": [0.01, 0.0],
                           "grad_norm": [2.0, 1.0], "val_step": list(steps),
                           "val_mse": val}}

    rows = [row("a", 0, [0.5, 0.25]), row("a", 1, [0.75, 0.5]),
            row("b", 0, [0.4, 0.3]), row("b", 1, [0.6, 0.2, 0.1], steps=(30, 60, 100))]
    summary = summarize(rows)
    steps, mean, half = validation_band(summary.contestant("a").chosen, "val_mse")
    assert steps == [50, 100] and mean == [0.625, 0.375] and half[0] > 0
    # a seed recorded on other steps is left out of the band, not misaligned into it
    steps, mean, _ = validation_band(summary.contestant("b").chosen, "val_mse")
    assert steps == [50, 100] and mean == [0.4, 0.3]
    md, page = write_report(summary, tmp_path)
    assert (tmp_path / "validation.png").stat().st_size > 1000
    assert "![curves](curves.png)\n![validation](validation.png)" in md.read_text()
    html = page.read_text()
    row_start = html.index("<div class='row'>")
    assert html.count("data:image/png;base64,", row_start, html.index("</div>", row_start)) == 2
    # runs stored before validation curves existed have no band (their reports keep the
    # training loss alone: test_report's rows)
    rows[0]["curves"] = {"step": [50, 100], "train_loss": [1.0, 0.5]}
    assert validation_band(summarize(rows[:1]).contestant("a").chosen, "val_mse") == \
        ([], [], [])


def test_a_sweep_sets_the_validation_schedule_and_refuses_a_negative_one():
    """``train.val_points`` is a sweep key (part of the run key when given; absent, the run
    keys of existing stores do not change)."""
    spec = parse_sweep({**TINY, "mechanisms": ["softmax"],
                        "train": {**TINY["train"], "val_points": 2}}).runs()[0]
    assert spec.train["val_points"] == 2
    default = parse_sweep({**TINY, "mechanisms": ["softmax"]}).runs()[0]
    assert "val_points" not in default.train and default.key != spec.key
    with pytest.raises(ValueError, match="val_points"):
        parse_sweep({**TINY, "mechanisms": ["softmax"],
                     "train": {**TINY["train"], "val_points": -1}})
