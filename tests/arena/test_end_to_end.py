"""Every task trains a tiny model for a few steps and its test metric moves the right way."""

import pytest
import torch

from attnlab.arena.config import parse_sweep
from attnlab.arena.trainer import train_run
from attnlab.tasks import TASKS, make_task

# (task parameters, model, steps, lr): small enough to learn something in seconds on a CPU
CASES = {
    "icl_regression": ({"context": 20, "eval_contexts": [10, 40]}, {"heads": 2}, 150, 1e-2),
    "test_time_regression": ({"context": 16, "eval_contexts": [16]}, {"heads": 2}, 150, 1e-2),
    "mqar": ({"vocab": 16, "seq_len": 16, "train_kv": [2], "eval_kv": [2]},
             {"dim": 32, "depth": 2, "heads": 2}, 150, 1e-2),
    "copy": ({"vocab": 8, "length": 6}, {"dim": 32, "depth": 2, "heads": 2}, 150, 1e-2),
    "selective_copy": ({"vocab": 6, "region": 8, "count": 2},
                       {"dim": 32, "depth": 2, "heads": 2}, 150, 1e-2),
    "induction": ({"vocab": 12, "length": 16, "segment": 4},
                  {"dim": 32, "depth": 2, "heads": 2}, 150, 1e-2),
    "char_lm": ({"length": 32}, {"dim": 32, "depth": 1, "heads": 2}, 60, 1e-2),
    "length_extrapolation": ({"length": 16, "multiples": [1, 2]},
                             {"dim": 32, "depth": 1, "heads": 2}, 60, 1e-2),
    "digits": ({"patch_size": 4}, {"dim": 32, "depth": 1, "heads": 2}, 60, 1e-2),
    "markov": ({"states": 3, "length": 32}, {"dim": 32, "depth": 1, "heads": 2}, 60, 1e-2),
    "backcopy": ({"vocab": 8, "length": 16}, {"dim": 32, "depth": 1, "heads": 2}, 60, 1e-2),
    "icl_maps": ({"symbols": 6, "maps": 3, "pairs": 4, "eval_shots": [0, 1, 3]},
                 {"dim": 32, "depth": 2, "heads": 2}, 150, 1e-2),
}


def test_every_task_has_an_end_to_end_case():
    assert set(CASES) == set(TASKS)


# These tasks train for 150 steps (1.5 to 1.9 s each on the 2-core CPU) and run with -m slow.
# The default run trains the other seven, which exercise the same trainer, evaluation and
# both metric directions: token accuracy (copy, the same TokenTask as mqar, induction,
# selective_copy and icl_maps), regression MSE (test_time_regression, the same
# InContextRegression as icl_regression), image accuracy (digits) and sequence losses.
SLOW = {"icl_maps", "icl_regression", "induction", "mqar", "selective_copy"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else [])
                                  for n in sorted(CASES)])
def test_training_moves_the_metric_the_right_way(name):
    params, model, steps, lr = CASES[name]
    sweep = parse_sweep({"task": name, "mechanisms": ["softmax"], "seeds": 1,
                         "task_params": params, "model": model,
                         "train": {"steps": steps, "batch_size": 32, "lr": lr}})
    spec = sweep.runs()[0]
    task = make_task(name, **params)
    torch.manual_seed(spec.seed)  # the same initial model as the run
    untrained = task.build_model("softmax", {}, **spec.model).eval()
    before = task.evaluate(untrained, "test").metrics[task.metric]
    result = train_run(spec)
    assert result["status"] == "done", result["error"]
    after = result["metrics"][task.metric]
    if task.higher_is_better:
        assert after > before + 0.05, (before, after)
    else:
        assert after < 0.9 * before, (before, after)
    assert result["curves"]["train_loss"][-1] < result["curves"]["train_loss"][0]
    assert f"val_{task.metric}" in result["metrics"]  # the validation metric chooses lr
