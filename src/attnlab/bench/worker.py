"""Measure one workload: every contestant on the same inputs, interleaved round by round.

Run by the bench runner as ``python -m attnlab.bench.worker JOB_JSON`` in a fresh process
(so one contestant's allocations do not count against another's peak, and a crash loses
one workload only). Prints JSON lines: ``{"event": "tick"}`` after every step (progress) and
finally ``{"event": "done", "rows": [...]}``.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable

import torch

from attnlab.bench.measure import (
    allocator_in_use,
    calls_per_sample,
    gemm_rate,
    peak_mb,
    status_kib,
    summarize,
    timed,
)
from attnlab.bench.suites import GROUPS
from attnlab.bench.workload import Workload, module_inputs, op_inputs


def make_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
              grad: torch.Tensor | None) -> Callable[[], None]:
    """Training: forward, backward with ``grad``, gradients dropped. Inference: no grad."""
    if grad is None:
        def inference_step() -> None:
            with torch.no_grad():
                forward()
        return inference_step

    def step() -> None:
        forward().backward(grad)
        for t in leaves:
            t.grad = None
    return step


def describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    if "can't allocate memory" in text or "out of memory" in text.lower():
        return "out of memory: " + text.splitlines()[0][:240]
    return text.splitlines()[0][:300] if text else type(err).__name__


def prepared(w: Workload) -> tuple[dict, list[torch.Tensor], torch.Tensor | None]:
    """The workload's shared inputs, the ones that get gradients, and the output gradient."""
    torch.manual_seed(0)
    inputs = module_inputs(w) if GROUPS[w.group].inputs == "module" else op_inputs(w)
    shared = [t for name, t in inputs.items() if name != "grad" and t.requires_grad]
    return inputs, shared, inputs.get("grad")


def measure_memory(w: Workload, name: str) -> dict:
    """Peak memory of one contestant's step, alone in this process (the CPU memory phase:
    run with ``PEAK_ALLOCATOR`` so that freed tensors leave the resident set, which would
    slow the timed steps down, hence a process of its own)."""
    inputs, shared, grad = prepared(w)
    try:
        forward, extra = GROUPS[w.group].contestant(name).prepare(w, inputs)
        step = make_step(forward, shared + extra, grad)
        step()  # warm-up: compiles, fills caches
        return {"peak_mb": peak_mb(step, w.device)}
    except Exception as err:  # noqa: BLE001
        return {"peak_mb": None, "memory_error": describe_error(err)}


def run_workload(w: Workload, names: list[str], *, memory_limit_bytes: float,
                 max_step_seconds: float, emit: Callable[[dict], None],
                 measure_peak: bool = True) -> list[dict]:
    """One row per contestant: status ``ok`` (times, median, spread, FLOP rate and, when
    ``measure_peak``, peak memory), ``skipped`` (why not run), ``too slow`` or ``error``."""
    group = GROUPS[w.group]
    inputs, shared, grad = prepared(w)
    flops = group.flops(w)
    gemm = gemm_rate(w.device, w.dtype) if flops else None
    base = {"group": w.group, "workload": w.key(), "gemm_flops_per_s": gemm,
            "malloc": allocator_in_use()}
    rows: dict[str, dict] = {}
    steps: dict[str, Callable[[], None]] = {}
    for name in names:
        contestant = group.contestant(name)
        row = rows[name] = {**base, "contestant": name, "peer": contestant.peer}
        reason = contestant.why_not(w, memory_limit_bytes)
        if reason:
            row.update(status="skipped", reason=reason)
            emit({"event": "tick", "steps": w.rounds + 2})
            continue
        try:
            forward, extra = contestant.prepare(w, inputs)
            step = make_step(forward, shared + extra, grad)
            first = timed(step, w.device)  # compiles, warms caches; not counted
            emit({"event": "tick", "steps": 1})
            if first > max_step_seconds:
                row.update(status="too slow", reason=f"its first step took {first:.0f} s "
                           f"(over --max-step-seconds {max_step_seconds:g})")
                emit({"event": "tick", "steps": w.rounds + 1})
                continue
            if measure_peak:
                row["peak_mb"] = peak_mb(step, w.device)
            row["calls"] = calls_per_sample(timed(step, w.device))  # a warm step sizes a sample
            emit({"event": "tick", "steps": 1})
            steps[name] = step
        except Exception as err:  # noqa: BLE001 - recorded with the row, the others go on
            row.update(status="error", reason=describe_error(err))
            emit({"event": "tick", "steps": w.rounds + 2 - ("peak_mb" in row)})
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(w.rounds):  # interleaved: each round runs every contestant once
        shift = r % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            if name not in steps:
                emit({"event": "tick", "steps": 1})
                continue
            try:
                times[name].append(timed(steps[name], w.device, rows[name]["calls"]))
            except Exception as err:  # noqa: BLE001
                rows[name].update(status="error", reason=describe_error(err))
                del steps[name]
            emit({"event": "tick", "steps": 1})
    for name, measured in times.items():
        if name not in steps:
            continue
        stats = summarize(measured)
        rows[name].update(status="ok", **stats, tokens_per_s=w.batch * w.length /
                          stats["median_s"], flops=flops)
        if flops and gemm:
            rows[name]["gemm_fraction"] = flops / stats["median_s"] / gemm
    return [rows[name] for name in names]


def limit_address_space(extra_bytes: float) -> None:
    """CPU: an allocation past the limit raises (recorded as out of memory) instead of the
    kernel killing the process or the machine swapping."""
    size_kib = status_kib("VmSize")
    if size_kib is not None:
        limit = int(size_kib * 1024 + extra_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    job = json.loads(sys.argv[1])
    w = Workload.from_key(job["workload"])
    if w.device == "cpu" and job.get("limit_address_space", True):
        try:
            limit_address_space(job["memory_limit_bytes"] * 1.5)
        except (OSError, ValueError):  # pragma: no cover - not Linux
            pass

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    if job.get("phase") == "memory":
        emit({"event": "done", "rows": [measure_memory(w, job["contestants"][0])]})
        return
    rows = run_workload(w, job["contestants"], memory_limit_bytes=job["memory_limit_bytes"],
                        max_step_seconds=job["max_step_seconds"], emit=emit,
                        measure_peak=job.get("phase") != "time")
    emit({"event": "done", "rows": rows})


if __name__ == "__main__":
    main()
