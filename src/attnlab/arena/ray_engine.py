"""Sweeps on Ray: each run of a sweep is a Ray task, on a local Ray instance or a cluster.

The process that runs the sweep (the Ray driver) keeps the store semantics of local workers:
it alone reads and writes the store, records each run as its task returns (done or
failed), and holds the store's claims, so a killed sweep resumes where it stopped. A task
gets the CPUs of its run's ``train.threads`` and one GPU when its ``train.device`` is CUDA.
A task whose worker process dies (killed, out of memory, node lost) is tried once more by
Ray, then recorded as failed. Progress (each run's training loss) comes back through a Ray
queue. Ray is the optional extra ``attnlab[ray]``, imported only here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from attnlab.arena.config import RunSpec
from attnlab.arena.trainer import failed_result, train_run

Finish = Callable[[RunSpec, dict[str, Any]], None]
Listener = Callable[[str, RunSpec | None, Any], None]


class EngineError(RuntimeError):
    """The engine cannot run the sweep (not installed, cluster unreachable or too small)."""


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EngineError("--engine ray needs Ray, which is not installed: "
                          "pip install 'attnlab[ray]'") from None
    return ray


def run_resources(spec: RunSpec) -> dict[str, float]:
    """What one run's task asks Ray for: its training threads as CPUs, a GPU for CUDA."""
    cuda = str(spec.train.get("device", "cpu")).startswith("cuda")
    return {"num_cpus": float(spec.train.get("threads", 1)), "num_gpus": 1.0 if cuda else 0.0}


def connect(address: str | None, cpus: int | None) -> bool:
    """Join the Ray cluster at ``address`` ("auto", "HOST:PORT", "ray://HOST:10001"), or
    start a local instance with ``cpus`` CPUs when None and RAY_ADDRESS is unset. Returns
    whether this call connected (False: this process was already connected, e.g. by the
    caller's own ``ray.init``)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    local = address is None and not os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, num_cpus=cpus if local else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EngineError(f"could not reach the Ray cluster at {address or 'RAY_ADDRESS'}: "
                          f"{err}") from None
    return True


def check_fits(todo: list[RunSpec], resources: dict[str, float]) -> None:
    """A run that asks for more than the whole cluster has would wait forever: refuse."""
    for spec in todo:
        for need, have_key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            want, have = run_resources(spec)[need], resources.get(have_key, 0.0)
            if want > have:
                raise EngineError(f"run {spec.label} seed {spec.seed} needs {want:g} "
                                  f"{have_key}(s) and the Ray cluster has {have:g}")


def _task(spec: RunSpec, events: Any) -> dict[str, Any]:
    """Body of a run's Ray task: train it, sending progress to the driver's queue."""
    events.put(("start", spec.key, {"pid": os.getpid()}))
    return train_run(spec, lambda step, steps, loss: events.put(
        ("step", spec.key, (step, steps, loss))))


def run_on_ray(todo: list[RunSpec], finish: Finish, listener: Listener, *,
               address: str | None = None, cpus: int | None = None,
               poll_seconds: float = 0.2) -> None:
    """Train ``todo`` as Ray tasks and ``finish`` each as it returns; Ctrl-C cancels the
    tasks in flight (what finished is stored)."""
    ray = require_ray()
    connected = connect(address, cpus)
    try:
        check_fits(todo, ray.cluster_resources())
        _run_tasks(todo, finish, listener, poll_seconds)
    finally:
        if connected:
            ray.shutdown()


def _run_tasks(todo: list[RunSpec], finish: Finish, listener: Listener,
               poll_seconds: float) -> None:
    import ray
    from ray.util.queue import Empty, Queue

    events = Queue(actor_options={"num_cpus": 0})
    remote = ray.remote(max_retries=1, retry_exceptions=False)(_task)
    refs = {remote.options(**run_resources(s)).remote(s, events): s for s in todo}
    by_key = {s.key: s for s in todo}
    finished: set[str] = set()

    def drain() -> None:
        while True:
            try:
                event, key, payload = events.get_nowait()
            except Empty:
                return
            if key not in finished:
                listener(event, by_key[key], payload)

    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll_seconds)
            drain()
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:  # its worker died twice, node lost
                    result = failed_result(f"Ray task failed: {type(err).__name__}: "
                                           f"{str(err).splitlines()[0]}")
                finished.add(spec.key)
                finish(spec, result)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(events.actor)
