"""Run a sweep: skip what the store has, train the rest on local workers, store each run
as it ends (so an interrupted sweep resumes where it stopped)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from attnlab.arena.config import RunSpec, Sweep
from attnlab.arena.store import RunStore, StoreError
from attnlab.arena.summary import summarize
from attnlab.arena.trainer import failed_result, train_run
from attnlab.distributed.launch import broadcast_from_first, data_parallel, group_alive

# (event, spec, payload): ("plan", None, Plan) first (and again before a staged sweep's
# second stage), then per run ("start", spec, None), ("step", spec, (step, steps, loss)),
# ("end", spec, result)
Listener = Callable[[str, RunSpec | None, Any], None]


class Plan(NamedTuple):
    """What a sweep (or one stage of it) is about to do."""

    todo: list[RunSpec]    # runs to train
    skipped: int           # runs already stored
    failed_kept: int       # stored failed runs not retried
    stage: str | None      # None (one stage), "tune" or "confirm" (``Sweep.tune_seeds``)


@dataclass
class SweepSummary:
    total: int
    skipped: int
    done: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (label/seed, error line)
    elsewhere: dict[str, str] = field(default_factory=dict)  # key -> process training it
    imported: int = 0  # results kept aside by an earlier run, now stored


def definition(sweep: Sweep) -> dict[str, Any]:
    """The sweep as stored: every key that decides which runs it has (workers excluded)."""
    return sweep.model_dump(mode="json", exclude={"workers"})


def sweep_rows(store: RunStore, sweep: Sweep) -> list[dict[str, Any]]:
    """The stored runs of exactly this sweep configuration (none of an earlier one)."""
    return store.rows(sweep.sweep_name, keys=[s.key for s in sweep.runs()])


def pending_runs(specs: list[RunSpec], store: RunStore, retry_failed: bool = False
                 ) -> tuple[list[RunSpec], int, int]:
    """Of ``specs``, the runs still to do, how many the store already holds, and how many
    of those failed (kept as they are unless ``retry_failed``)."""
    stored = store.statuses([s.key for s in specs])
    todo = [s for s in specs if s.key not in stored
            or (retry_failed and stored[s.key] == "failed")]
    failed_kept = 0 if retry_failed else sum(v == "failed" for v in stored.values())
    return todo, len(specs) - len(todo), failed_kept


def chosen_points(sweep: Sweep, store: RunStore) -> dict[str, dict[str, Any]]:
    """Each contestant's grid point best on validation over the tuning seeds (label ->
    {key: value}), from the stored runs of the first stage; contestants with no finished
    tuning run are left out."""
    rows = store.rows(sweep.sweep_name, keys=[s.key for s in sweep.tuning_runs()])
    if not rows:
        return {}
    summary = summarize(rows, list(sweep.train.grid()), tuning_seeds=sweep.tuning_seeds)
    return {c.label: c.chosen.values for c in summary.contestants if c.chosen is not None}


def stages(sweep: Sweep, store: RunStore) -> Iterator[tuple[str | None, list[RunSpec]]]:
    """(stage, runs) in order: every run at once (stage None), or for a sweep with
    ``tune_seeds`` the grid on the tuning seeds ("tune"), then, once those are stored,
    each contestant's chosen point on the other seeds ("confirm")."""
    if not sweep.staged:
        yield None, sweep.runs()
        return
    yield "tune", sweep.tuning_runs()
    yield "confirm", sweep.confirming_runs(chosen_points(sweep, store))


ENGINES = ("local", "ray")


def run_sweep(sweep: Sweep, *, retry_failed: bool = False, workers: int | None = None,
              listener: Listener | None = None, engine: str = "local",
              address: str | None = None, part_of: Sweep | None = None) -> SweepSummary:
    """Train every run of ``sweep`` not yet in its store; returns what happened.

    ``part_of``: the sweep whose definition the store keeps under the name (default
    ``sweep``; an architecture search trains one design of its sweep of every design).

    ``engine``: ``"local"`` (worker processes on this machine) or ``"ray"`` (one Ray task per
    run, on the cluster at ``address`` or a local Ray instance; ``arena.ray_engine``); the
    store is read and written by this process alone either way.
    Under torchrun (a process group of several ranks), every run is trained data-parallel
    by all ranks, one run at a time: rank 0 alone reads and writes the store and tells the
    others which runs to train."""
    listener = listener or (lambda *_: None)
    workers = workers or sweep.worker_count
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    ranks = data_parallel()
    if ranks is not None and engine != "local":
        raise ValueError("under torchrun each run is trained by the whole process group; "
                         f"--engine {engine} cannot be combined with it")
    if engine == "ray":
        from attnlab.arena.ray_engine import require_ray

        require_ray()  # a missing extra is said before the store is touched
    if ranks is not None and ranks[0] != 0:
        return _follow(sweep)
    with RunStore(sweep.store) as store:
        store.save_definition(sweep.sweep_name, definition(part_of or sweep))
        summary = SweepSummary(total=0, skipped=0, imported=store.import_kept(sweep.runs()))
        for stage, specs in stages(sweep, store):
            todo, skipped, failed_kept = pending_runs(specs, store, retry_failed)
            todo, elsewhere = store.claim(todo, retry_failed)
            if ranks is not None:
                broadcast_from_first([s.key for s in todo])
            summary.total += len(todo) + skipped + len(elsewhere)
            summary.skipped += skipped
            summary.elsewhere.update(elsewhere)
            listener("plan", None, Plan(todo, skipped, failed_kept, stage))
            try:
                if engine == "ray":
                    from attnlab.arena.ray_engine import run_on_ray

                    run_on_ray(todo, _finisher(store, summary, listener), listener,
                               address=address, cpus=workers * sweep.train.threads)
                else:
                    _train(todo, store, summary, 1 if ranks is not None else workers,
                           listener)
            finally:
                store.release(todo)
    return summary


def _follow(sweep: Sweep) -> SweepSummary:
    """A rank other than 0 under torchrun: train the runs rank 0 names, store nothing."""
    specs = {s.key: s for s in sweep.runs()}
    summary = SweepSummary(total=0, skipped=0)
    for _ in range(2 if sweep.staged else 1):  # rank 0 names each stage's runs in turn
        keys = broadcast_from_first(None)
        summary.total += len(keys)
        for key in keys:
            result = train_run(specs[key])
            if result["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                summary.failures.append((key, (result["error"] or "").splitlines()[0]))
                stop_if_group_lost(f"run {key}")
    return summary


def stop_if_group_lost(who: str) -> None:
    """After a failed run under torchrun: GroupError when a process of the group no longer
    answers (every rank calls this after the same failed run)."""
    lost = group_alive()
    if lost is not None:
        raise GroupError(f"{who} failed and a process of the group no longer answers "
                         f"({lost}); the run is recorded as failed and the sweep stops: the "
                         "runs not yet trained stay pending")


class GroupError(RuntimeError):
    """A process of a torchrun group died or stopped answering: the sweep stops."""


def _finisher(store: RunStore, summary: SweepSummary, listener: Listener
              ) -> Callable[[RunSpec, dict[str, Any]], None]:
    """What happens when a run ends, whatever trained it: store it, count it, tell."""

    def finish(spec: RunSpec, result: dict[str, Any]) -> None:
        try:
            store.record(spec, result)
        except (sqlite3.Error, OSError) as err:
            _keep_aside(store, spec, result, err)
        if result["status"] == "done":
            summary.done += 1
        else:
            summary.failed += 1
            first = (result["error"] or "").splitlines()[0]
            summary.failures.append((f"{spec.label} seed {spec.seed}", first))
        listener("end", spec, result)
        if result["status"] != "done" and data_parallel() is not None:
            stop_if_group_lost(f"run {spec.label} seed {spec.seed}")

    return finish


def _train(todo: list[RunSpec], store: RunStore, summary: SweepSummary, workers: int,
           listener: Listener) -> None:
    """Train ``todo`` (claimed runs) on local workers, storing each run as it ends."""
    finish = _finisher(store, summary, listener)
    if workers == 1 or len(todo) <= 1:
        for spec in todo:
            listener("start", spec, None)
            # mypy cannot infer a lambda with a default argument against Progress
            finish(spec, train_run(spec, lambda s, n, loss, spec=spec:  # type: ignore[misc]
                                   listener("step", spec, (s, n, loss))))
    else:
        _run_parallel(todo, min(workers, len(todo)), finish, listener)


def _keep_aside(store: RunStore, spec: RunSpec, result: dict[str, Any],
                err: BaseException) -> None:
    """The database refused a finished run: keep it in a side file and stop the sweep (the
    next runs would meet the same error), saying where it is."""
    who = f"run {spec.label} seed {spec.seed}"
    try:
        kept = store.keep_aside(spec, result)
    except OSError as err2:
        raise StoreError(f"could not store {who} in {store.path} ({err}) nor keep it aside "
                         f"({err2}); it stays pending and runs again next time") from err
    raise StoreError(f"could not store {who} in {store.path}: {err}. Its result is kept in "
                     f"{kept}; the next `attnlab arena run` of this sweep stores it once the "
                     "store is writable again.") from err


_worker: dict[str, Any] = {}  # the worker process's parent pid and event queue


def _worker_init(parent: int, events: Any) -> None:
    _worker.update(parent=parent, events=events)  # each run sets its own thread count


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    events = _worker["events"]

    def progress(step: int, steps: int, loss: float) -> None:
        if os.getppid() != _worker["parent"]:  # the sweep was killed: nobody stores this run
            os._exit(1)
        events.put(("step", spec.key, (step, steps, loss)))

    events.put(("start", spec.key, None))
    return train_run(spec, progress)


def _run_parallel(todo: list[RunSpec], workers: int,
                  finish: Callable[[RunSpec, dict[str, Any]], None],
                  listener: Listener) -> None:
    """Spawned worker processes (fork is unsafe after torch has started its threads).

    If a worker process dies (killed, out of memory), the pool breaks and every run in
    flight fails with it; those runs get one more try in a fresh pool, then are recorded
    as failed with the error.
    """
    ctx = mp.get_context("spawn")
    by_key = {s.key: s for s in todo}
    crashes: dict[str, int] = {}
    finished: set[str] = set()  # late progress events of these runs are dropped
    remaining = list(todo)
    events = ctx.Queue()  # handed to the workers when they start (no manager process)
    try:
        while remaining:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(os.getpid(), events)) as pool:
                futures: dict[Future, RunSpec] = {pool.submit(_worker_run, s): s
                                                  for s in remaining}
                remaining = []
                try:
                    while futures:
                        done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                        _drain(events, by_key, finished, listener)
                        for fut in done:
                            spec = futures.pop(fut)
                            try:
                                result = fut.result()
                            except BrokenProcessPool as err:
                                crashes[spec.key] = crashes.get(spec.key, 0) + 1
                                if crashes[spec.key] > 1:
                                    finished.add(spec.key)
                                    finish(spec, _crashed(err))
                                else:
                                    remaining.append(spec)
                                continue
                            finished.add(spec.key)
                            finish(spec, result)
                except BaseException:  # interrupted: stop the workers, keep what is stored
                    pool.shutdown(wait=False, cancel_futures=True)
                    for child in mp.active_children():
                        child.terminate()
                    raise
    finally:
        events.close()
        events.cancel_join_thread()


def _crashed(err: BaseException) -> dict[str, Any]:
    return failed_result(f"worker process died: {type(err).__name__}: {err}")


def _drain(events: Any, by_key: dict[str, RunSpec], finished: set[str],
           listener: Listener) -> None:
    while True:
        try:
            event, key, payload = events.get_nowait()
        except queue.Empty:
            return
        if key not in finished:
            listener(event, by_key[key], payload)
