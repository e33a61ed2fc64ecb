"""Sweeps: results stored once per run, resumed after interruption (SIGKILL included),
failures recorded while the sweep goes on, parallel workers."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from attnlab.arena import sweep as sweep_module
from attnlab.arena.config import parse_sweep
from attnlab.arena.store import RunStore
from attnlab.arena.sweep import run_sweep
from attnlab.tasks.copying import Copy

TINY = {"task": "copy", "task_params": {"vocab": 6, "length": 4},
        "model": {"dim": 16, "depth": 1, "heads": 2},
        "train": {"steps": 3, "batch_size": 4, "curve_points": 3}}


def tiny(tmp_path, **extra):
    return parse_sweep({**TINY, "mechanisms": ["softmax", "sigmoid"], "seeds": 2,
                        "workers": 1, "store": str(tmp_path / "runs"), **extra})


def test_every_run_is_stored_once_and_a_second_run_skips_them(tmp_path):
    sweep = tiny(tmp_path)
    events = []
    summary = run_sweep(sweep, listener=lambda e, spec, p: events.append(
        (e, spec.label) if spec is not None else (e, len(p[0]), p[1])))
    assert (summary.total, summary.done, summary.skipped, summary.failed) == (4, 4, 0, 0)
    assert events[0] == ("plan", 4, 0) and [e[0] for e in events].count("plan") == 1
    assert events.count(("start", "softmax")) == 2 and events.count(("end", "sigmoid")) == 2
    with RunStore(sweep.store) as store:
        rows = store.rows(sweep.sweep_name)
    assert len(rows) == 4
    row = rows[0]
    assert row["status"] == "done" and row["params"] > 0 and row["wall_time"] > 0
    assert set(row["metrics"]) >= {"accuracy", "loss"} and row["slices"]
    assert row["curves"]["step"] == [1, 2, 3] and len(row["curves"]["train_loss"]) == 3
    assert row["config"]["train"]["steps"] == 3 and "machine" in row["config"]
    again = run_sweep(sweep)
    assert (again.done, again.skipped) == (0, 4)
    more = run_sweep(tiny(tmp_path, seeds=3))  # one more seed: only its runs are new
    assert (more.done, more.skipped) == (2, 4)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    original = Copy.loss

    def loss(self, model, batch):
        if model.mechanisms == ["sigmoid"]:
            raise RuntimeError("boom in sigmoid")
        return original(self, model, batch)

    monkeypatch.setattr(Copy, "loss", loss)
    sweep = tiny(tmp_path)
    summary = run_sweep(sweep)
    assert (summary.done, summary.failed) == (2, 2)
    assert all("boom in sigmoid" in err for _, err in summary.failures)
    with RunStore(sweep.store) as store:
        failed = [r for r in store.rows() if r["status"] == "failed"]
    assert len(failed) == 2 and "RuntimeError: boom in sigmoid" in failed[0]["error"]
    assert run_sweep(sweep).skipped == 4  # failed runs are finished runs ...
    monkeypatch.setattr(Copy, "loss", original)
    retried = run_sweep(sweep, retry_failed=True)  # ... unless asked to retry them
    assert (retried.done, retried.skipped) == (2, 2)
    with RunStore(sweep.store) as store:
        assert [r["status"] for r in store.rows()].count("done") == 4


@pytest.mark.slow  # 5 s of two worker processes: .ci/run runs it (pytest -m slow)
def test_parallel_workers_store_the_same_runs(tmp_path):
    sweep = tiny(tmp_path, workers=2)
    seen = []
    summary = run_sweep(sweep, listener=lambda e, spec, p: seen.append(e))
    assert (summary.done, summary.failed) == (4, 0)
    assert "step" in seen and seen.count("end") == 4
    with RunStore(sweep.store) as store:
        assert len(store.rows()) == 4


@pytest.mark.slow  # 5 s of two worker processes: .ci/run runs it (pytest -m slow)
def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    # each run sets its own thread count (part of its key), so one worker and two give
    # the same numbers, and a resumed sweep cannot mix results of different thread counts
    config = {**TINY, "task": "markov", "task_params": {"states": 3, "length": 24},
              "mechanisms": ["softmax", "softplus"], "seeds": 1,
              "train": {**TINY["train"], "steps": 8}}
    results = {}
    for workers in (1, 2):
        sweep = parse_sweep({**config, "workers": workers,
                             "store": str(tmp_path / f"w{workers}")})
        run_sweep(sweep)
        with RunStore(sweep.store) as store:
            results[workers] = {r["key"]: r["metrics"]["loss"] for r in store.rows()}
    assert results[1] == results[2]
    threads = parse_sweep({**config, "train": {**config["train"], "threads": 2}})
    assert {s.key for s in threads.runs()}.isdisjoint(results[1])
    assert sweep_module.definition(threads)["train"]["threads"] == 2


def _count(db):
    """Stored runs; 0 while the store's file exists without its schema yet (the sweep
    process creates the file, then the table: polling in between once read no table)."""
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return 0
            raise


@pytest.mark.slow  # spawns and kills a sweep process: ~10 s (.ci/run runs it with -m slow)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_sweep_loses_no_finished_run_and_repeats_none(tmp_path, workers):
    config = tmp_path / "sweep.toml"
    config.write_text(
        'task = "copy"\nmechanisms = ["softmax", "sigmoid", "softplus"]\nseeds = 3\n'
        f'workers = {workers}\nstore = "{tmp_path / "runs"}"\n'
        '[task_params]\nvocab = 6\nlength = 8\n'
        '[model]\ndim = 16\ndepth = 1\nheads = 2\n[train]\nsteps = 20\nbatch_size = 8\n')
    cmd = [sys.executable, "-m", "attnlab.cli", "arena", "run", "--config", str(config),
           "--no-report"]
    db = tmp_path / "runs" / "runs.sqlite"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not db.exists() or _count(db) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = _count(db)
    assert 2 <= stored < 9, "the sweep must be killed mid-way for this test to mean anything"
    with RunStore(tmp_path / "runs") as store:
        before = {r["key"]: r["finished"] for r in store.rows()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert f"{stored} already in" in out.stdout and f"{9 - stored} to run" in out.stdout
    with RunStore(tmp_path / "runs") as store:
        after = {r["key"]: r["finished"] for r in store.rows()}
    assert len(after) == 9
    assert all(after[k] == t for k, t in before.items())  # finished runs were not redone


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_interrupt_keeps_finished_runs(tmp_path, monkeypatch, workers):
    sweep = tiny(tmp_path, workers=workers)
    calls = []

    def listener(event, spec, payload):
        calls.append(event)
        if calls.count("end") == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, listener=listener)
    with RunStore(sweep.store) as store:
        assert len(store.rows()) == 2
    assert run_sweep(sweep).done == 2


def test_a_store_error_after_training_keeps_the_run_and_says_where(tmp_path, monkeypatch):
    from attnlab.arena.store import StoreError

    sweep = tiny(tmp_path, mechanisms=["softmax"], seeds=1)

    def refuse(self, spec, result):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(RunStore, "record", refuse)
    with pytest.raises(StoreError, match="kept in .*unsaved"):
        run_sweep(sweep)
    kept = list((tmp_path / "runs" / "unsaved").glob("*.json"))
    assert len(kept) == 1
    monkeypatch.undo()
    summary = run_sweep(sweep)  # the next run stores the kept result instead of training
    assert (summary.imported, summary.done, summary.skipped) == (1, 0, 1)
    assert not kept[0].exists()
    with RunStore(sweep.store) as store:
        assert [r["status"] for r in store.rows(sweep.sweep_name)] == ["done"]


@pytest.mark.parametrize("content", [b"", b"this is not a database" * 100])
def test_a_damaged_store_is_named_damaged(tmp_path, content):
    from attnlab.arena.store import StoreError

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "runs.sqlite").write_bytes(content)
    with pytest.raises(StoreError, match="empty|damaged"):
        RunStore(tmp_path / "runs")


def test_a_store_damaged_after_its_first_page_is_named_damaged_before_a_resume(tmp_path):
    """Issue 41: with the first page intact the store opened, and the resume died with a
    raw sqlite3.DatabaseError; SQLite's own check now says "damaged" when it is opened."""
    from attnlab.arena.store import StoreError

    sweep = tiny(tmp_path)
    run_sweep(sweep)
    path = tmp_path / "runs" / "runs.sqlite"
    with RunStore(sweep.store):  # a checkpoint: everything in the main file
        pass
    data = path.read_bytes()
    assert len(data) > 3 * 4096
    path.write_bytes(data[:4096] + bytes(len(data) - 4096))
    for readonly in (False, True):
        with pytest.raises(StoreError, match="damaged"):
            RunStore(tmp_path / "runs", readonly=readonly)


@pytest.mark.parametrize("blocker", ["file", "read-only"])
def test_a_store_folder_that_cannot_be_made_is_a_clean_error(tmp_path, blocker):
    from attnlab.arena.store import StoreError

    if blocker == "file":
        (tmp_path / "afile").write_text("")
        where = tmp_path / "afile" / "runs"
    else:
        if os.geteuid() == 0:  # root writes everywhere: the file case covers the message
            where = tmp_path / "afile2" / "runs"
            (tmp_path / "afile2").write_text("")
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            where = tmp_path / "ro" / "runs"
    with pytest.raises(StoreError, match="cannot create the result store folder .*--store"):
        RunStore(where)


def test_a_read_only_store_can_be_listed_and_reported(tmp_path):
    """Listing and reporting open the store without writing anything (the WAL pragma and
    the schema used to write), so a read-only folder or a copy serves them."""
    sweep = tiny(tmp_path, mechanisms=["softmax"], seeds=1)
    run_sweep(sweep)
    folder = tmp_path / "runs"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    folder.chmod(0o555)
    real_access, real_connect, statements = os.access, sqlite3.connect, []

    def traced(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    try:  # (tests may run as root, whom chmod does not stop: say the folder is read-only)
        os.access = lambda path, mode: False if mode == os.W_OK else real_access(path, mode)
        sqlite3.connect = traced
        with RunStore(folder, readonly=True) as store:
            assert store.sweeps()[0]["done"] == 1
            assert len(store.rows(sweep.sweep_name)) == 1
    finally:
        os.access, sqlite3.connect = real_access, real_connect
        folder.chmod(0o755)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    reads = ("SELECT", "PRAGMA QUICK_CHECK")  # SQLite's integrity check only reads
    assert statements and all(s.lstrip().upper().startswith(reads) for s in statements)


def test_two_processes_never_train_the_same_run(tmp_path):
    """A second sweep process sees the first one's claims (a live pid) and skips them; a
    claim of a dead process is taken over."""
    sweep = tiny(tmp_path)
    with RunStore(sweep.store) as store:
        mine, elsewhere = store.claim(sweep.runs())
        assert len(mine) == 4 and not elsewhere
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            with store.conn:
                store.conn.execute("UPDATE claims SET pid = ?", (other.pid,))
            summary = run_sweep(sweep)
            assert (summary.done, len(summary.elsewhere)) == (0, 4)
        finally:
            other.kill()
            other.wait()
    summary = run_sweep(sweep)  # the claimer died: its runs are taken over
    assert summary.done == 4
