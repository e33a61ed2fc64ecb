"""Sweeps on Ray (``--engine ray``): a local Ray instance started by the tests; the store
semantics are those of local workers (every finished run stored once with the same numbers,
failures recorded, a killed or interrupted sweep resumes)."""

import dataclasses
import os
import signal
import sys

import pytest
from click.testing import CliRunner

from attnlab.arena import ray_engine
from attnlab.arena.config import parse_sweep
from attnlab.arena.ray_engine import EngineError, check_fits, require_ray, run_resources
from attnlab.arena.store import RunStore
from attnlab.arena.sweep import run_sweep
from attnlab.cli import main

TINY = {"task": "copy", "task_params": {"vocab": 6, "length": 4},
        "model": {"dim": 16, "depth": 1, "heads": 2},
        "train": {"steps": 4, "batch_size": 4, "curve_points": 4}}


def tiny(path, **extra):
    return parse_sweep({**TINY, "mechanisms": ["softmax", "sigmoid"], "seeds": 1,
                        "store": str(path), **extra})


def test_a_missing_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(EngineError, match=r"pip install 'attnlab\[ray\]'"):
        require_ray()
    result = CliRunner().invoke(main, ["arena", "run", "--task", "copy", "--mechanisms",
                                       "softmax", "--seeds", "1", "--steps", "1", "--store",
                                       str(tmp_path / "runs"), "--engine", "ray"])
    assert result.exit_code == 1 and "attnlab[ray]" in result.output
    assert not (tmp_path / "runs").exists()  # said before anything is written


def test_address_without_the_ray_engine_is_refused():
    result = CliRunner().invoke(main, ["arena", "run", "--task", "copy", "--address", "x:1"])
    assert result.exit_code == 2 and "--engine ray" in result.output


def test_a_task_asks_for_its_runs_threads_and_a_gpu_for_cuda():
    spec = tiny("unused", train={**TINY["train"], "threads": 2}).runs()[0]
    assert run_resources(spec) == {"num_cpus": 2.0, "num_gpus": 0.0}
    cuda = dataclasses.replace(spec, train={**spec.train, "device": "cuda"})
    assert run_resources(cuda) == {"num_cpus": 2.0, "num_gpus": 1.0}
    with pytest.raises(EngineError, match="needs 1 GPU"):
        check_fits([spec, cuda], {"CPU": 8.0})
    check_fits([spec, cuda], {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(EngineError, match="needs 2 CPU"):
        check_fits([spec], {"CPU": 1.0})


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for the module; the engine joins it and leaves it
    running (it did not start it)."""
    ray = pytest.importorskip("ray", reason="the ray extra is part of the dev install")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def stored(path):
    with RunStore(path) as store:
        return {r["key"]: r for r in store.rows()}


@pytest.mark.slow  # several seconds; .ci/run runs the slow tests too
def test_runs_on_ray_are_stored_once_with_the_numbers_of_local_workers(local_ray, tmp_path):
    events = []
    sweep = tiny(tmp_path / "ray")
    summary = run_sweep(sweep, engine="ray", listener=lambda e, spec, p: events.append(e))
    assert (summary.done, summary.failed, summary.skipped) == (2, 0, 0)
    assert events.count("start") == 2 and events.count("end") == 2 and "step" in events
    run_sweep(tiny(tmp_path / "local"), engine="local")
    on_ray, local = stored(tmp_path / "ray"), stored(tmp_path / "local")
    assert on_ray.keys() == local.keys()
    for key, row in on_ray.items():
        assert row["status"] == "done" and row["metrics"] == local[key]["metrics"]
        assert row["curves"] == local[key]["curves"]
        assert (tmp_path / "ray" / "models" / f"{key}.safetensors").read_bytes() == \
            (tmp_path / "local" / "models" / f"{key}.safetensors").read_bytes()
    again = run_sweep(sweep, engine="ray")
    assert (again.done, again.skipped) == (0, 2)


@pytest.mark.slow  # ~7 s with the local Ray start (.ci/run runs it with -m slow)
def test_a_failing_run_on_ray_is_recorded_and_the_sweep_goes_on(local_ray, tmp_path):
    # a grid over lr: two runs, the second diverges at once
    sweep = parse_sweep({**TINY, "store": str(tmp_path), "seeds": 1, "mechanisms": ["softmax"],
                         "train": {**TINY["train"], "lr": [3e-3, 1e38]}})
    summary = run_sweep(sweep, engine="ray")
    assert (summary.done, summary.failed) == (1, 1)
    rows = {r["config"]["train"]["lr"]: r for r in stored(tmp_path).values()}
    assert rows[3e-3]["status"] == "done" and rows[1e38]["status"] == "failed"
    assert "overflow" in rows[1e38]["error"]


@pytest.mark.slow
def test_an_interrupted_ray_sweep_resumes_without_repeating_a_run(local_ray, tmp_path):
    sweep = tiny(tmp_path, seeds=2)
    ended = []

    def stop_after_first(event, spec, payload):
        if event == "end":
            ended.append(spec.key)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, engine="ray", listener=stop_after_first)
    assert list(stored(tmp_path)) == ended  # the finished run is stored, nothing else
    resumed = run_sweep(sweep, engine="ray")
    assert (resumed.done, resumed.skipped) == (3, 1)


@pytest.mark.slow
@pytest.mark.parametrize("kills, status", [(1, "done"), (2, "failed")])
def test_a_killed_ray_worker_is_retried_once_then_recorded(local_ray, tmp_path, kills,
                                                           status):
    """SIGKILL the process training a run: Ray runs it once more; killed again, the run is
    recorded as failed and the sweep goes on."""
    sweep = parse_sweep({**TINY, "mechanisms": ["softmax"], "seeds": 1,
                         "train": {**TINY["train"], "steps": 400}, "store": str(tmp_path)})
    killed = []

    def kill_on_start(event, spec, payload):
        if event == "start" and len(killed) < kills:
            killed.append(payload["pid"])
            os.kill(payload["pid"], signal.SIGKILL)

    summary = run_sweep(sweep, engine="ray", listener=kill_on_start)
    assert len(killed) == kills
    (row,) = stored(tmp_path).values()
    assert row["status"] == status
    if status == "failed":
        assert "Ray task failed" in row["error"] and summary.failed == 1


@pytest.mark.slow  # ~8 s with the local Ray start: .ci/run runs it (pytest -m slow)
def test_the_cli_runs_a_sweep_on_ray(local_ray, tmp_path):
    result = CliRunner().invoke(main, [
        "arena", "run", "--task", "copy", "--mechanisms", "softmax", "--seeds", "1",
        "--steps", "2", "--param", "vocab=6", "--param", "length=4", "--store",
        str(tmp_path), "--engine", "ray", "--no-report"])
    assert result.exit_code == 0, result.output
    assert "one Ray task per run" in result.output and "done" in result.output
    assert len(stored(tmp_path)) == 1


def test_ray_engine_module_imports_ray_lazily():
    assert "ray" not in vars(ray_engine)
