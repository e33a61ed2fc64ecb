"""Run a suite: one worker process per workload, results saved after each workload (an
interrupted run keeps what it measured; the same command again measures only the rest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from attnlab.bench.measure import ALLOCATORS, PEAK_ALLOCATOR, with_allocator
from attnlab.bench.peers import peer_versions
from attnlab.bench.suites import GROUPS
from attnlab.bench.workload import Workload
from attnlab.machine import machine, provenance

Progress = Callable[[str, int, int], None]  # (workload label, steps done, steps in all)


def row_key(row: dict) -> str:
    return json.dumps([row["workload"], row["contestant"]], sort_keys=True)


def report_stem(out: Path, suite: str, device: str, host: str) -> Path:
    return out / f"bench-{suite}-{device.split(':')[0]}-{host}"


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def save(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def run_worker(w: Workload, names: list[str], *, memory_limit_gb: float,
               max_step_seconds: float, on_tick: Callable[[int], None],
               phase: str = "both", malloc: str = "mmap-off") -> list[dict]:
    """Measure ``w`` in a fresh process; a worker that dies is recorded as an error row for
    every contestant it had not finished. ``phase``: "time" (interleaved rounds), "memory"
    (one contestant's peak, malloc returning freed memory to the OS) or "both" (CUDA, whose
    allocator counts its own peak). ``malloc``: the allocator setting (``ALLOCATORS``) of
    the timed phases."""
    job = {"workload": w.key(), "contestants": names, "phase": phase,
           "memory_limit_bytes": memory_limit_gb * 2**30, "max_step_seconds": max_step_seconds}
    env = with_allocator({**os.environ, "PYTHONUNBUFFERED": "1"},
                         PEAK_ALLOCATOR if phase == "memory" else ALLOCATORS[malloc])
    proc = subprocess.Popen([sys.executable, "-m", "attnlab.bench.worker", json.dumps(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None  # both piped
    rows = None
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a peer printing to stdout
            if event.get("event") == "tick":
                on_tick(event["steps"])
            elif event.get("event") == "done":
                rows = event["rows"]
        err = proc.stderr.read()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rows is None:
        why = (err.strip().splitlines() or ["no output"])[-1][:300]
        rows = [{"group": w.group, "workload": w.key(), "contestant": n, "status": "error",
                 "reason": f"worker exited with code {proc.returncode}: {why}"} for n in names]
    return rows


def run_suite(workloads: list[Workload], *, suite: str, device: str, out: Path,
              contestants: tuple[str, ...] | None = None, memory_limit_gb: float = 12.0,
              max_step_seconds: float = 60.0, fresh: bool = False, malloc: str = "mmap-off",
              command: str | None = None, progress: Progress | None = None,
              on_saved: Callable[[dict, Path], None] | None = None) -> tuple[dict, Path]:
    """Measure every workload not already in the report (``fresh``: measure the given
    workloads again, keeping the report's rows of other workloads); returns the report and
    its JSON path. ``on_saved`` is called after each save. ``malloc``: the allocator setting
    of the timed workers (``ALLOCATORS``), recorded with the run and with each row."""
    if malloc not in ALLOCATORS:
        raise ValueError(f"unknown allocator setting {malloc!r}; choose from {list(ALLOCATORS)}")
    info = machine()
    path = report_stem(out, suite, device, info["host"]).with_suffix(".json")
    report = load(path)
    if report is None:
        report = {"suite": suite, "device": device, "machine": info, "runs": [], "rows": []}
    report["machine"], report["peers"] = info, peer_versions()
    report["runs"].append({**provenance(command), "malloc": malloc})
    done = set() if fresh else {row_key(r) for r in report["rows"]}
    plans = []
    for w in workloads:
        names = [n for n in GROUPS[w.group].contestants
                 if contestants is None or n in contestants or n == GROUPS[w.group].baseline]
        todo = [n for n in names if row_key({"workload": w.key(), "contestant": n}) not in done]
        if todo:
            plans.append((w, names))
    total = sum(len(names) * (w.rounds + 2) for w, names in plans)
    finished = 0
    for w, names in plans:
        def tick(steps: int, w=w) -> None:
            nonlocal finished
            finished += steps
            if progress:
                progress(w.label(), finished, total)

        cpu = not device.startswith("cuda")
        rows = run_worker(w, names, memory_limit_gb=memory_limit_gb,
                          max_step_seconds=max_step_seconds, on_tick=tick,
                          phase="time" if cpu else "both", malloc=malloc)
        for row in rows:
            if cpu and row.get("status") == "ok":  # the CPU peak: a process per contestant
                memory = run_worker(w, [row["contestant"]], memory_limit_gb=memory_limit_gb,
                                    max_step_seconds=max_step_seconds, on_tick=tick,
                                    phase="memory")[0]
                row["peak_mb"] = memory.get("peak_mb")
                if memory.get("memory_error") or memory.get("reason"):
                    row["memory_error"] = memory.get("memory_error") or memory["reason"]
        for row in rows:  # ratios are only taken between rows measured together
            row["measured_together"] = f"run {len(report['runs']) - 1}: {w.label()}"
        keys = {row_key(r) for r in rows}
        report["rows"] = [r for r in report["rows"] if row_key(r) not in keys] + rows
        save(report, path)
        if on_saved:
            on_saved(report, path)
    return report, path
