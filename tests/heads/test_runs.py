"""Arena runs keep their models; the microscope opens a run by its key."""

import pytest
import torch

from attnlab import heads as hd
from attnlab.arena.config import parse_sweep
from attnlab.arena.store import RunStore
from attnlab.arena.sweep import run_sweep


def test_a_finished_run_keeps_its_weights_and_loads_by_key_with_the_same_metrics(tmp_path):
    sweep = parse_sweep({"task": "copy", "task_params": {"vocab": 6, "length": 4},
                         "model": {"dim": 16, "depth": 1, "heads": 2},
                         "train": {"steps": 5, "batch_size": 4}, "mechanisms": ["sigmoid"],
                         "seeds": 2, "workers": 1, "store": str(tmp_path / "runs")})
    run_sweep(sweep)
    with RunStore(sweep.store) as db:
        rows = db.rows(sweep.sweep_name)
    assert len(rows) == 2
    for row in rows:
        run = hd.load_run(sweep.store, row["key"][:8])  # a short key is enough
        assert run.key == row["key"] and run.row["seed"] == row["seed"]
        evaluated = run.task.evaluate(run.model, "test").metrics
        assert evaluated["accuracy"] == pytest.approx(row["metrics"]["accuracy"], abs=1e-9)
        assert evaluated["loss"] == pytest.approx(row["metrics"]["loss"], rel=1e-5)
        assert [s.heads for s in hd.sites(run.model)] == [2]
    other = hd.load_run(sweep.store, rows[1]["key"])
    assert not torch.equal(next(other.model.parameters()),
                           next(hd.load_run(sweep.store, rows[0]["key"]).model.parameters()))


def test_bad_keys_and_missing_models_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result store"):
        hd.load_run(tmp_path / "none", "abc")
    sweep = parse_sweep({"task": "copy", "task_params": {"vocab": 6, "length": 4},
                         "model": {"dim": 16, "depth": 1, "heads": 2},
                         "train": {"steps": 2, "batch_size": 4}, "mechanisms": ["softmax"],
                         "seeds": 1, "workers": 1, "store": str(tmp_path / "runs")})
    run_sweep(sweep)
    with pytest.raises(KeyError, match="no run with key 'fff"):
        hd.load_run(sweep.store, "fffffff")
    with pytest.raises(KeyError, match="not a run key"):
        hd.load_run(sweep.store, "x%")
    with RunStore(sweep.store) as db:
        key = db.rows()[0]["key"]
        db.model_path(key).unlink()
    with pytest.raises(FileNotFoundError, match="no saved model"):
        hd.load_run(sweep.store, key)
