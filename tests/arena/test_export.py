"""`attnlab arena export` (CSV and Parquet tables of a store) and the TensorBoard and W&B
loggers of `attnlab arena run --log`."""

import csv
import importlib.util
import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner

from attnlab.arena.config import parse_sweep
from attnlab.arena.export import CURVE_COLUMNS, RUN_COLUMNS
from attnlab.arena.loggers import WandbLogger, scalars
from attnlab.arena.store import RunStore, curve_points
from attnlab.arena.trainer import failed_result
from attnlab.cli import main

SWEEP = """
task = "markov"
name = "tiny"
seeds = 1
mechanisms = ["softmax"]
[task_params]
states = 3
length = 24
[model]
dim = 16
depth = 1
heads = 2
[train]
steps = 6
batch_size = 4
curve_points = 3
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one run trained by `arena run` (`--log tensorboard` where the tensorboard
    extra is installed: the README's test command does not install it, .ci/run does for this
    file), one run as an older attnlab stored it (training loss only) and one failed run."""
    root = tmp_path_factory.mktemp("arena")
    (root / "tiny.toml").write_text(SWEEP)
    log = (["--log", "tensorboard", "--log-dir", str(root / "logs")]
           if importlib.util.find_spec("tensorboard") else [])
    result = CliRunner().invoke(main, [
        "arena", "run", "--config", str(root / "tiny.toml"), "--store", str(root / "store"),
        "--workers", "1", "--no-report", *log])
    assert result.exit_code == 0, result.output
    data = {"task": "markov", "name": "tiny", "seeds": [1, 2], "mechanisms": ["linear"],
            "task_params": {"states": 3, "length": 24}, "train": {"steps": 6}}
    old, failed = parse_sweep(data).runs()
    with RunStore(root / "store") as db:
        db.record(old, {**failed_result(None), "status": "done", "params": 10,
                        "metrics": {"loss": 1.5, "val_loss": 1.25}, "wall_time": 0.5,
                        "curves": {"step": [3, 6], "train_loss": [1.75, 1.5]}})
        db.record(failed, failed_result("FloatingPointError: training loss is nan\nTrace"))
    return root


def stored(root):
    with RunStore(root / "store", readonly=True) as db:
        return db.rows()


def test_csv_export_has_one_row_per_run_and_per_curve_point(store):
    out = store / "csv"
    result = CliRunner().invoke(main, ["arena", "export", "--store", str(store / "store"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = stored(store)
    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert [r["key"] for r in runs] == [r["key"] for r in rows]
    assert list(runs[0])[:len(RUN_COLUMNS)] == list(RUN_COLUMNS)
    for line, row in zip(runs, rows, strict=True):
        assert (line["label"], int(line["seed"]), line["status"]) == \
            (row["label"], row["seed"], row["status"])
        assert line["model.dim"] == str(row["config"]["model"]["dim"])
        assert float(line["train.lr"]) == row["config"]["train"]["lr"]
        for name, value in row["metrics"].items():
            assert float(line[f"metrics.{name}"]) == value  # written exactly
        assert set(row["metrics"]) == {k[8:] for k in line if k.startswith("metrics.")
                                       and line[k] != ""}
    trained, old, failed = runs
    assert float(trained["wall_time"]) > 0 and trained["finished"].endswith("Z")
    assert failed["error"] == "FloatingPointError: training loss is nan"  # first line
    assert failed["metrics.loss"] == ""
    with open(out / "curves.csv", newline="") as f:
        points = list(csv.DictReader(f))
    assert list(points[0]) == list(CURVE_COLUMNS)
    expected = [(r["key"], name, step, value) for r in rows
                for name, step, value in curve_points(r["curves"])]
    assert [(p["key"], p["metric"], int(p["step"]), float(p["value"])) for p in points] == \
        expected
    names = {p["metric"] for p in points if p["key"] == trained["key"]}
    assert {"train_loss", "lr", "grad_norm", "val_loss", "val_accuracy"} <= names
    assert {p["metric"] for p in points if p["key"] == old["key"]} == {"train_loss"}
    assert "stored" not in result.output and "3 run(s)" in result.output


def test_parquet_export_reads_back_with_pyarrow(store):
    pq = pytest.importorskip("pyarrow.parquet")
    out = store / "parquet"
    result = CliRunner().invoke(main, ["arena", "export", "--store", str(store / "store"),
                                       "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = stored(store)
    runs = pq.read_table(out / "runs.parquet").to_pylist()
    assert [r["key"] for r in runs] == [r["key"] for r in rows]
    for line, row in zip(runs, rows, strict=True):
        assert line["seed"] == row["seed"] and line["model.dim"] == \
            row["config"]["model"]["dim"]
        assert line["train.lr"] == row["config"]["train"]["lr"]
        for name, value in row["metrics"].items():
            assert line[f"metrics.{name}"] == value
    points = pq.read_table(out / "curves.parquet").to_pylist()
    assert [(p["key"], p["metric"], p["step"], p["value"]) for p in points] == \
        [(r["key"], n, s, v) for r in rows for n, s, v in curve_points(r["curves"])]
    try:
        import pandas
    except ImportError:
        return
    frame = pandas.read_parquet(out / "curves.parquet")
    assert len(frame) == len(points)


def test_export_errors(store, tmp_path, monkeypatch):
    runner = CliRunner()
    path = str(store / "store")
    assert runner.invoke(main, ["arena", "export", "--store", path, "--format",
                                "xlsx"]).exit_code == 2
    missing = runner.invoke(main, ["arena", "export", "--store", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "no result store" in missing.output
    unknown = runner.invoke(main, ["arena", "export", "--store", path, "--sweep", "nope"])
    assert unknown.exit_code == 2 and "tiny" in unknown.output
    (tmp_path / "file").write_text("")
    assert runner.invoke(main, ["arena", "export", "--store", path, "--out",
                                str(tmp_path / "file")]).exit_code == 2
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    result = runner.invoke(main, ["arena", "export", "--store", path, "--format", "parquet",
                                  "--out", str(tmp_path / "pq")])
    assert result.exit_code == 1
    assert "pip install 'attnlab[parquet]'" in result.output
    assert not (tmp_path / "pq").exists()
    assert "Examples" in runner.invoke(main, ["arena", "export", "--help"]).output


def test_tensorboard_event_files_hold_the_stored_scalars(store):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    row = stored(store)[0]
    folders = list((store / "logs" / "tensorboard" / "tiny").iterdir())
    assert [f.name for f in folders] == [f"softmax-seed0-{row['key'][:8]}"]
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    # what the store holds, under the names the loggers give: train/..., val/..., test/...
    expected: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in curve_points(row["curves"]):
        tag = f"val/{name[4:]}" if name.startswith("val_") else \
            f"train/{name.removeprefix('train_')}"
        expected.setdefault(tag, []).append((step, value))
    for name, value in row["metrics"].items():
        if not name.startswith("val_"):
            expected[f"test/{name}"] = [(6, value)]
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "test/loss"} <= \
        set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard keeps float32: the stored value rounded once, nothing else
        assert logged == [(step, torch.tensor(v, dtype=torch.float32).item())
                          for step, v in points], tag


def test_a_missing_logger_package_is_said_before_anything_runs(store, tmp_path,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    result = CliRunner().invoke(main, [
        "arena", "run", "--config", str(store / "tiny.toml"), "--store",
        str(tmp_path / "s"), "--log", "wandb"])
    assert result.exit_code == 1 and "pip install 'attnlab[wandb]'" in result.output
    assert not (tmp_path / "s").exists()
    bad = CliRunner().invoke(main, ["arena", "run", "--config", str(store / "tiny.toml"),
                                    "--log", "mlflow"])
    assert bad.exit_code == 2
    alone = CliRunner().invoke(main, ["arena", "run", "--config", str(store / "tiny.toml"),
                                      "--log-dir", str(tmp_path)])
    assert alone.exit_code == 2 and "--log" in alone.output


@pytest.mark.slow
def test_wandb_offline_writes_its_run_directory(store, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    row = stored(store)[0]
    WandbLogger(tmp_path, project="attnlab-test").log(row)
    # run.finish() can return before W&B's service has written the run's records (a CI
    # run read a file holding only its 7-byte header); the service writes everything by
    # the time it stops, which teardown waits for (at exit it runs by itself)
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))  # the run's records, for `wandb sync`
    assert len(records) == 1
    # wandb has no reader of its own for this file; its history items are protobuf
    # messages holding the key, then (field 16) the value as JSON text
    data = records[0].read_bytes()
    for values in scalars(row).values():
        for tag, value in values.items():
            item = re.escape(tag.encode()) + rb"\x82\x01." + re.escape(json.dumps(value).encode())
            assert re.search(item, data, re.DOTALL), (tag, value)


def test_a_failing_logger_is_counted_in_the_final_line_not_reported_as_logged(tmp_path,
                                                                              monkeypatch):
    """A logger that fails on every run (e.g. W&B without an account): the sweep goes on,
    and the last line says how many runs were logged and how many failed."""
    import attnlab.arena.loggers as loggers

    class Failing:
        kind = "wandb"

        def log(self, row):
            raise RuntimeError("No API key configured")

    monkeypatch.setattr(loggers, "make_loggers", lambda kinds, log_dir, project: [Failing()])
    (tmp_path / "tiny.toml").write_text(SWEEP)
    result = CliRunner().invoke(main, [
        "arena", "run", "--config", str(tmp_path / "tiny.toml"), "--store",
        str(tmp_path / "store"), "--workers", "1", "--no-report", "--log", "wandb"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "wandb logger failed" in text
    assert "wandb: 0 run(s) logged" in text and "; 1 failed" in text


def test_parquet_text_columns_stay_text_when_every_value_is_null(tmp_path):
    """A store without a failed run has no error text: the column is still a string column
    (it was int64, so tables from two stores did not concatenate)."""
    pq = pytest.importorskip("pyarrow.parquet")
    from attnlab.arena.export import write_parquet

    path = write_parquet([{"key": "a", "error": None, "extra": None, "seed": 0}],
                         ["key", "error", "extra", "seed"], tmp_path / "runs.parquet")
    schema = pq.read_table(path).schema
    assert [str(schema.field(n).type) for n in ("key", "error", "extra", "seed")] == \
        ["string", "string", "string", "int64"]
