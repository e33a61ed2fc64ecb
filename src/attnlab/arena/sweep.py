"""Run a sweep: skip what the store has, train the rest on local workers, store each run
as it ends (so an interrupted sweep resumes where it stopped)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from attnlab.arena.config import RunSpec, Sweep
from attnlab.arena.store import RunStore
from attnlab.arena.trainer import train_run

# (event, spec, payload): ("start", spec, None), ("step", spec, (step, steps, loss)),
# ("end", spec, result)
Listener = Callable[[str, RunSpec, Any], None]


@dataclass
class SweepSummary:
    total: int
    skipped: int
    done: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (label/seed, error line)


def pending_runs(sweep: Sweep, store: RunStore, retry_failed: bool = False
                 ) -> tuple[list[RunSpec], int]:
    """Runs still to do, and how many the store already holds."""
    specs = sweep.runs()
    stored = store.statuses([s.key for s in specs])
    todo = [s for s in specs if s.key not in stored
            or (retry_failed and stored[s.key] == "failed")]
    return todo, len(specs) - len(todo)


def run_sweep(sweep: Sweep, *, retry_failed: bool = False, workers: int | None = None,
              listener: Listener | None = None) -> SweepSummary:
    """Train every run of ``sweep`` not yet in its store; returns what happened."""
    listener = listener or (lambda *_: None)
    workers = workers or sweep.workers
    with RunStore(sweep.store) as store:
        todo, skipped = pending_runs(sweep, store, retry_failed)
        summary = SweepSummary(total=len(todo) + skipped, skipped=skipped)

        def finish(spec: RunSpec, result: dict[str, Any]) -> None:
            store.record(spec, result)
            if result["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                first = (result["error"] or "").splitlines()[0]
                summary.failures.append((f"{spec.label} seed {spec.seed}", first))
            listener("end", spec, result)

        if workers == 1 or len(todo) <= 1:
            for spec in todo:
                listener("start", spec, None)
                finish(spec, train_run(spec, lambda s, n, loss, spec=spec:
                                       listener("step", spec, (s, n, loss))))
        else:
            _run_parallel(todo, min(workers, len(todo)), finish, listener)
    return summary


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker_run(spec: RunSpec, events: Any) -> dict[str, Any]:
    events.put(("start", spec.key, None))
    return train_run(spec, lambda s, n, loss: events.put(("step", spec.key, (s, n, loss))))


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
    remaining = list(todo)
    with ctx.Manager() as manager:
        events = manager.Queue()
        while remaining:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(_threads_per_worker(workers),)) as pool:
                futures: dict[Future, RunSpec] = {pool.submit(_worker_run, s, events): s
                                                  for s in remaining}
                remaining = []
                try:
                    while futures:
                        done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                        _drain(events, by_key, listener)
                        for fut in done:
                            spec = futures.pop(fut)
                            try:
                                result = fut.result()
                            except BrokenProcessPool as err:
                                crashes[spec.key] = crashes.get(spec.key, 0) + 1
                                if crashes[spec.key] > 1:
                                    finish(spec, _crashed(err))
                                else:
                                    remaining.append(spec)
                                continue
                            finish(spec, result)
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise


def _crashed(err: BaseException) -> dict[str, Any]:
    return {"status": "failed", "metrics": {}, "slices": {}, "baselines": {}, "curves": {},
            "params": None, "wall_time": None,
            "error": f"worker process died: {type(err).__name__}: {err}"}


def _drain(events: Any, by_key: dict[str, RunSpec], listener: Listener) -> None:
    while True:
        try:
            event, key, payload = events.get_nowait()
        except queue.Empty:
            return
        listener(event, by_key[key], payload)
