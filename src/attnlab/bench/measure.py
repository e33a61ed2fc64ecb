"""Clocks and meters: one step's time, a step's peak memory, the machine's GEMM rate."""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from attnlab.bench.workload import DTYPES

# glibc serves every allocation of 32 MiB or more with a fresh mmap and unmaps it when it is
# freed, so a step whose tensors reach 32 MiB ((8, 16384, 64) float32 at L = 16k) page-faults on
# each new activation: a MALA module step at 16k took 967 ms, 685 ms with mmap off (2-core
# CPU), and every contestant's time grew faster than its work past that size. The timed
# workers run with mmap off by default (``--malloc``); each row records the setting.
ALLOCATORS: dict[str, dict[str, str]] = {
    "mmap-off": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
    "default": {},
}
# The memory phase: freed blocks leave the resident set, so a step's peak is its own.
PEAK_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def with_allocator(env: dict[str, str], settings: dict[str, str]) -> dict[str, str]:
    """``env`` with glibc's malloc variables replaced by ``settings`` (none inherited)."""
    return {**{k: v for k, v in env.items() if k not in MALLOC_VARS}, **settings}


def allocator_in_use() -> str:
    """This process's allocator setting: a name of ``ALLOCATORS``, the malloc variables it
    runs with otherwise, or ``default (not glibc)`` where they mean nothing."""
    if platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    env = {k: os.environ[k] for k in MALLOC_VARS if k in os.environ}
    for name, settings in ALLOCATORS.items():
        if env == settings:
            return name
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], object], device: str, calls: int = 1) -> float:
    """Seconds per call of ``step``, called ``calls`` times back to back (the device's queue
    drained before and after)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls


# A timed sample lasts at least this long: a step of 0.1 ms timed alone is as much timer,
# cache state and the progress output between samples as it is step (spreads of +-20-80%
# on the decode workloads); such a step is called back to back and the mean per call kept.
MIN_SAMPLE_S = 0.02
MAX_CALLS = 1000


def calls_per_sample(seconds_per_call: float) -> int:
    """How many calls of a step lasting ``seconds_per_call`` make one timed sample of at
    least ``MIN_SAMPLE_S`` (1 for any step that long, at most ``MAX_CALLS``)."""
    if seconds_per_call <= 0:
        return MAX_CALLS
    return max(1, min(MAX_CALLS, math.ceil(MIN_SAMPLE_S / seconds_per_call)))


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, VmSize), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_supported() -> bool:
    """Linux lets a process reset its peak resident size (``clear_refs``), so each step's
    peak can be read in one process, contestants interleaved."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


def peak_mb(step: Callable[[], None], device: str) -> float | None:
    """Peak memory a call of ``step`` adds over what was in use before it, in MB (10^6 B).

    CUDA: the caching allocator's peak of allocated bytes. CPU: the peak resident size
    (VmHWM after a reset) over the resident size before; the worker process runs with
    ``PEAK_ALLOCATOR`` so freed tensors leave the resident set. None where the
    OS gives no resettable peak."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    if not cpu_peak_supported():
        step()
        return None
    before = cast(int, status_kib("VmRSS"))  # cpu_peak_supported: /proc/self/status is there
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return (cast(int, status_kib("VmHWM")) - before) * 1024 / 1e6


def gemm_rate(device: str, dtype: str, *, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in ``dtype`` on ``device`` (median of ``repeats``): the
    ceiling a contestant's nominal FLOPs are compared with."""
    n = size or (8192 if device.startswith("cuda") else 2048)
    a, b = (torch.randn(n, n, device=device).to(DTYPES[dtype]) for _ in range(2))
    torch.matmul(a, b)
    times = [timed(lambda: torch.matmul(a, b), device) for _ in range(repeats)]
    return 2 * n**3 / statistics.median(times)


def summarize(times: list[float]) -> dict:
    """Median and spread ((max - min) / median) of a contestant's rounds."""
    median = statistics.median(times)
    return {"times": times, "median_s": median,
            "spread": (max(times) - min(times)) / median if median > 0 else 0.0}
