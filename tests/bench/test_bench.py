"""attnlab bench: contestants agree on the math, rounds interleave, reports and resumes."""

import json
import time

import pytest
import torch
from click.testing import CliRunner

from attnlab.bench import report as report_module
from attnlab.bench.contestants import OPS, Contestant
from attnlab.bench.measure import (
    ALLOCATORS,
    MAX_CALLS,
    MIN_SAMPLE_S,
    PEAK_ALLOCATOR,
    allocator_in_use,
    calls_per_sample,
    cpu_peak_supported,
    peak_mb,
    summarize,
    with_allocator,
)
from attnlab.bench.runner import run_suite
from attnlab.bench.suites import GROUPS, TARGETS, Group
from attnlab.bench.worker import run_workload
from attnlab.bench.workload import Workload, op_inputs
from attnlab.cli import main


def workload(group: str, length: int = 96, mode: str = "inference", **kw) -> Workload:
    return Workload(group=group, length=length, mode=mode, dtype="fp32", device="cpu",
                    rounds=2, **{**GROUPS[group].shape, **kw})


def outputs(w: Workload, names: list[str]) -> dict[str, torch.Tensor]:
    x = op_inputs(w)
    with torch.no_grad():
        return {n: OPS[n].prepare(w, x)[0]() for n in names}


@pytest.mark.parametrize("group, names", [
    ("scored", ["sigmoid/attnlab", "sigmoid/dense"]),
    ("scored", ["softmax/sdpa", "softmax/attnlab-reference"]),
    ("neighborhood", ["neighborhood/sdpa-masked", "neighborhood/attnlab"]),
    ("decode", ["decode/matmul", "decode/attnlab", "decode/sdpa-repeat-kv",
                "decode/sdpa-gqa"]),
])
def test_contestants_of_a_group_compute_the_same_thing(group, names):
    w = workload(group, kernel=16) if group == "neighborhood" else workload(group)
    got = outputs(w, names)
    first = got[names[0]]
    for name in names[1:]:
        torch.testing.assert_close(got[name], first, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("group, names", [
    ("scored", ["sigmoid/dense", "sigmoid/flex"]),
    ("scored", ["softmax/sdpa", "softmax/flex"]),
    ("neighborhood", ["neighborhood/attnlab", "neighborhood/flex", "neighborhood/natten"]),
])
def test_compiled_flex_and_natten_contestants_agree(group, names):
    pytest.importorskip("natten") if "neighborhood/natten" in names else None
    w = workload(group, length=256, kernel=32) if group == "neighborhood" else \
        workload(group, length=256)
    got = outputs(w, names)
    for name in names[1:]:
        torch.testing.assert_close(got[name], got[names[0]], atol=2e-5, rtol=1e-4, msg=name)


def recorder(calls: list, name: str) -> Contestant:
    def prepare(w, x):
        def forward():
            calls.append(name)
            return x["q"] * 1.0
        return forward, []
    return Contestant(name, "torch", prepare)


def test_rounds_interleave_the_contestants_and_skips_say_why(monkeypatch):
    calls: list[str] = []
    fakes = {n: recorder(calls, n) for n in ("a", "b", "c")}
    fakes["d"] = Contestant("d", "flex", lambda w, x: (None, []), needs_backward_on_cpu=False)
    monkeypatch.setitem(GROUPS, "fake", Group("fake", "", ("a", "b", "c", "d"), "a"))
    monkeypatch.setattr("attnlab.bench.suites.OPS", fakes)
    monkeypatch.setattr("attnlab.bench.worker.calls_per_sample", lambda seconds: 1)
    w = Workload(group="fake", length=8, mode="train", dtype="fp32", device="cpu", rounds=3)
    ticks = []
    rows = run_workload(w, ["a", "b", "c", "d"], memory_limit_bytes=2**30,
                        max_step_seconds=60, emit=lambda e: ticks.append(e["steps"]))
    # warm-up, peak and sample-sizing step of each, then rounds rotating the order
    assert calls == ["a", "a", "a", "b", "b", "b", "c", "c", "c",
                     "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "skipped"]
    assert rows[3]["reason"] == "FlexAttention has no backward on CPU"
    assert all(len(r["times"]) == 3 for r in rows[:3])
    assert sum(ticks) == 4 * (3 + 2)  # the progress bar's total is reached exactly


def test_a_short_step_is_timed_as_the_mean_of_calls_back_to_back(monkeypatch):
    """A step far shorter than a sample is called enough times for one (the count recorded
    in its row), and its times are per call; a step as long as a sample is called once."""
    calls: list[str] = []
    naps = {"short": 0.0005, "long": MIN_SAMPLE_S * 1.5}

    def napper(name):
        def prepare(w, x):
            def forward():
                calls.append(name)
                time.sleep(naps[name])
                return x["q"] * 1.0
            return forward, []
        return Contestant(name, "torch", prepare)

    monkeypatch.setitem(GROUPS, "fake", Group("fake", "", ("short", "long"), "short"))
    monkeypatch.setattr("attnlab.bench.suites.OPS", {n: napper(n) for n in naps})
    w = Workload(group="fake", length=8, mode="inference", dtype="fp32", device="cpu",
                 rounds=2)
    short, long = run_workload(w, ["short", "long"], memory_limit_bytes=2**30,
                               max_step_seconds=60, emit=lambda e: None, measure_peak=False)
    assert 1 < short["calls"] <= MIN_SAMPLE_S / naps["short"]
    assert long["calls"] == 1
    # warm-up and sizing step, then `calls` per round
    assert calls.count("short") == 2 + 2 * short["calls"]
    assert calls.count("long") == 2 + 2
    # per call, not per sample: a sample of `calls` calls lasts about MIN_SAMPLE_S, one call
    # ~naps["short"] (the bound leaves room for a loaded machine's late wake-ups)
    assert all(naps["short"] <= t < MIN_SAMPLE_S / 2 for t in short["times"])
    assert calls_per_sample(MIN_SAMPLE_S / 10) == 10 and calls_per_sample(0.0) == MAX_CALLS


def test_a_failing_contestant_is_recorded_and_the_others_still_run(monkeypatch):
    calls: list[str] = []

    def broken(w, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 1 TB")

    monkeypatch.setitem(GROUPS, "fake", Group("fake", "", ("a", "bad"), "a"))
    monkeypatch.setattr("attnlab.bench.suites.OPS",
                        {"a": recorder(calls, "a"), "bad": Contestant("bad", "torch", broken)})
    w = Workload(group="fake", length=8, mode="inference", dtype="fp32", device="cpu",
                 rounds=2)
    rows = run_workload(w, ["a", "bad"], memory_limit_bytes=2**30, max_step_seconds=60,
                        emit=lambda e: None)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error" and rows[1]["reason"].startswith("out of memory")


def test_dense_contestants_over_the_memory_limit_are_not_run():
    w = workload("scored", length=16384)
    reason = OPS["sigmoid/dense"].why_not(w, memory_limit_bytes=8 * 2**30)
    assert reason and "over the 8 GiB limit" in reason
    assert OPS["sigmoid/attnlab"].why_not(w, memory_limit_bytes=8 * 2**30) is None


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux's resettable peak RSS")
def test_peak_memory_sees_a_step_that_allocates_200_mb():
    big = torch.ones(100_000_000)  # 400 MB: raises the process's peak before the step
    del big
    held = []
    got = peak_mb(lambda: held.append(torch.ones(50_000_000)), "cpu")  # 200 MB
    assert 190 < got < 260, got
    held.clear()
    assert peak_mb(lambda: None, "cpu") < 20


def test_summary_is_median_and_relative_spread():
    assert summarize([3.0, 1.0, 2.0]) == {"times": [3.0, 1.0, 2.0], "median_s": 2.0,
                                          "spread": 1.0}


def test_workload_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode must be"):
        workload("scored", mode="eval")
    with pytest.raises(ValueError, match="dtype must be"):
        Workload(group="scored", length=8, mode="train", dtype="fp16", device="cpu")


def synthetic(rows: list[tuple]) -> dict:
    """A report from (group, contestant, length, median seconds, measured-together id[,
    window K])."""
    out = []
    for group, name, length, median, together, *kernel in rows:
        w = workload(group, length=length, mode="train" if group == "scored" else "inference",
                     **({"kernel": kernel[0]} if kernel else {}))
        out.append({"group": group, "workload": w.key(), "contestant": name, "status": "ok",
                    "median_s": median, "spread": 0.0, "times": [median], "peak_mb": 1.0,
                    "measured_together": together})
    return {"suite": "x", "device": "cpu", "rows": out, "runs": [],
            "machine": {"cpu": "c", "cores": 2, "torch": "t", "python": "p",
                        "platform": "l"}}


def test_ratios_only_between_rows_measured_together():
    rep = synthetic([("scored", "softmax/sdpa", 4096, 1.0, "run 0"),
                     ("scored", "sigmoid/attnlab", 4096, 1.25, "run 0"),
                     ("scored", "lssa/attnlab", 4096, 1.0, "run 1")])
    rows = rep["rows"]
    assert report_module.ratio(rows[1], rows) == pytest.approx(0.8)
    assert report_module.ratio(rows[2], rows) is None  # another run: no ratio


def test_targets_are_judged_from_the_rows():
    by_label = {t.label: t for t in TARGETS}
    rep = synthetic([("scored", "softmax/sdpa", 4096, 1.0, "r"),
                     ("scored", "sigmoid/attnlab", 4096, 1.25, "r"),
                     ("scored", "lssa/attnlab", 4096, 1.2, "r")])
    sigmoid = report_module.evaluate(by_label["sigmoid training >= 0.9x SDPA at L=4096"], rep)
    lssa = report_module.evaluate(by_label["LSSA training >= 0.8x SDPA at L=4096"], rep)
    assert (sigmoid["reached"], round(sigmoid["value"], 3)) == (False, 0.8)
    assert (lssa["reached"], round(lssa["value"], 3)) == (True, 0.833)
    # time doubling with L: exponent 1; K = 128 at 16k: ideal 128x, measured 64x = 50%
    rep = synthetic([("neighborhood", "neighborhood/sdpa-masked", 16384, 64.0, "r"),
                     ("neighborhood", "neighborhood/attnlab", 16384, 1.0, "r"),
                     ("neighborhood", "neighborhood/attnlab", 8192, 0.5, "s")])
    ideal = report_module.evaluate(
        by_label["neighborhood inference >= 50% of ideal L/K at L=16384"], rep)
    growth = report_module.evaluate(
        by_label["neighborhood time grows <= 1.1x per unit of L (K = 128)"], rep)
    assert ideal["reached"] and ideal["value"] == pytest.approx(0.5)
    assert growth["reached"] and growth["value"] == pytest.approx(1.0)


def test_a_window_sweep_runs_over_k_at_one_length_and_its_exponent_is_in_k():
    """The neighborhood-k group: one workload per K at a fixed L, tables and curves over K
    (cells keyed by K, not L, so that the K's at one L do not overwrite each other)."""
    from attnlab.bench.suites import workloads

    ws = workloads("scaling", "cpu", ("fp32",), 3, groups=("neighborhood-k",))
    assert [(w.length, w.kernel) for w in ws] == [(16384, k) for k in (32, 64, 128, 256, 512)]
    assert ws[0].label() == "neighborhood-k L=16384 K=32 inference fp32"
    rep = synthetic([("neighborhood-k", name, 16384, t, f"k{kernel}", kernel)
                     for kernel, mine in ((32, 0.1), (64, 0.2), (128, 0.4))
                     for name, t in (("neighborhood/sdpa-masked", 4.0),
                                     ("neighborhood/attnlab", mine))])
    rows = rep["rows"]
    assert report_module.curve(rows, "neighborhood/attnlab", "median_s") == (
        [32, 64, 128], [0.1, 0.2, 0.4])
    growth = report_module.evaluate(
        next(t for t in TARGETS if t.group == "neighborhood-k"), rep)
    assert growth["value"] == pytest.approx(1.0) and "over K = 32..128" in growth["text"]
    md = report_module.markdown(rep)
    assert "| contestant | K=32 | K=64 | K=128 | time exponent |" in md
    assert "at a fixed L, (1, 8, L, 64)" in md and "L = 16384; forward (no grad)" in md
    assert "| neighborhood/attnlab | 100 ms ±0% · 40.00x |" in md
    table = report_module.readme_table(rep, "neighborhood-k", "inference", "fp32")
    assert table.startswith("| contestant | K=32 | K=64 | K=128 |")


def test_fit_exponent():
    assert report_module.fit_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert report_module.fit_exponent([1], [1]) is None


@pytest.mark.slow  # 6-12 s of worker processes: .ci/run runs it (pytest -m slow)
def test_a_suite_run_writes_json_and_markdown_and_resumes(tmp_path):
    w = workload("decode", length=256)
    seen = []
    rep, path = run_suite([w], suite="decode", device="cpu", out=tmp_path,
                          contestants=("decode/attnlab",),
                          progress=lambda label, done, total: seen.append((done, total)))
    assert [r["contestant"] for r in rep["rows"]] == ["decode/matmul", "decode/attnlab"]
    assert all(r["status"] == "ok" and r["peak_mb"] is not None for r in rep["rows"])
    assert seen[-1] == (2 * 4, 2 * 4)
    md = report_module.write_outputs(rep, path, plots=False)
    text = md.read_text()
    assert "decode/attnlab" in text and "attnlab bench" in text and "GEMM" in text
    saved = json.loads(path.read_text())
    assert saved["rows"] == rep["rows"]
    again, _ = run_suite([w], suite="decode", device="cpu", out=tmp_path,
                         contestants=("decode/attnlab",), progress=None)
    assert again["rows"] == rep["rows"] and len(again["runs"]) == 2  # nothing re-measured


def glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


@pytest.mark.slow  # 6-12 s of worker processes: .ci/run runs it (pytest -m slow)
def test_timed_workers_run_with_the_allocator_setting_and_rows_record_it(tmp_path,
                                                                        monkeypatch):
    # the worker reads its own environment: the row says what the process ran with
    w = workload("decode", length=64)
    kw = dict(suite="decode", device="cpu", contestants=("decode/attnlab",), fresh=True)
    rep, _ = run_suite([w], out=tmp_path / "a", **kw)
    expected = "mmap-off" if glibc() else "default (not glibc)"
    assert rep["runs"][-1]["malloc"] == "mmap-off"
    assert {r["malloc"] for r in rep["rows"]} == {expected}
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")  # the user's own setting is not inherited
    rep, _ = run_suite([w], out=tmp_path / "b", malloc="default", **kw)
    assert {r["malloc"] for r in rep["rows"]} == {"default" if glibc() else expected}
    with pytest.raises(ValueError, match="unknown allocator setting"):
        run_suite([w], out=tmp_path / "c", malloc="jemalloc", **kw)


def test_the_cli_offers_every_allocator_setting():
    from attnlab.cli.bench import run

    option = next(p for p in run.params if p.name == "malloc")
    assert set(option.type.choices) == set(ALLOCATORS) and option.default in ALLOCATORS


def test_allocator_environments():
    env = {"PATH": "/bin", "MALLOC_MMAP_MAX_": "0", "MALLOC_MMAP_THRESHOLD_": "1"}
    assert with_allocator(env, {}) == {"PATH": "/bin"}
    assert with_allocator(env, PEAK_ALLOCATOR) == {"PATH": "/bin", **PEAK_ALLOCATOR}
    assert with_allocator({}, ALLOCATORS["mmap-off"])["MALLOC_MMAP_MAX_"] == "0"


@pytest.mark.skipif(not glibc(), reason="the malloc variables are glibc's")
def test_allocator_in_use_names_the_setting(monkeypatch):
    for var in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    assert allocator_in_use() == "default"
    for var, value in ALLOCATORS["mmap-off"].items():
        monkeypatch.setenv(var, value)
    assert allocator_in_use() == "mmap-off"
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "5")
    assert allocator_in_use() == "MALLOC_MMAP_MAX_=5 MALLOC_TRIM_THRESHOLD_=" + str(1 << 40)


def test_rows_of_another_allocator_setting_are_marked_and_left_out_of_exponents():
    rep = synthetic([("neighborhood", "neighborhood/sdpa-masked", 4096, 1.0, "a"),
                     ("neighborhood", "neighborhood/attnlab", 4096, 0.1, "a"),
                     ("neighborhood", "neighborhood/attnlab", 8192, 0.9, "b"),
                     ("neighborhood", "neighborhood/attnlab", 16384, 0.4, "c"),
                     ("neighborhood", "neighborhood/attnlab", 32768, 0.8, "d")])
    for row in rep["rows"][3:]:
        row["malloc"] = "mmap-off"  # the first three rows were timed before it was recorded
    rows = rep["rows"]
    assert report_module.curve(rows, "neighborhood/attnlab", "median_s") == (
        [16384, 32768], [0.4, 0.8])
    growth = report_module.evaluate(
        next(t for t in TARGETS if t.label.startswith("neighborhood time grows")
             and t.group == "neighborhood"), rep)
    assert growth["value"] == pytest.approx(1.0)  # not the 0.1 -> 0.9 step of another setting
    md = report_module.markdown(rep)
    assert "Timed with the allocator setting `mmap-off`; † with `default`" in md
    assert "| neighborhood/attnlab | 100 ms ±0% † · 10.00x | 900 ms ±0% † | 400 ms ±0% |" in md
    dead = {**rows[-1], "status": "error", "workload": {**rows[-1]["workload"], "length": 1}}
    del dead["malloc"]  # a worker that died records no setting: the latest stays mmap-off
    rep["rows"].append(dead)
    table = report_module.readme_table(rep, "neighborhood", "inference", "fp32")
    assert "| neighborhood/attnlab | error | 100 ms † (10.00x), 1 MB | 900 ms †, 1 MB |" in table
    assert table.endswith("(not comparable).")


def test_a_cell_measured_again_shows_only_its_latest_row_everywhere():
    """A run with other rounds keeps the same cell's older row in the JSON (another workload
    key), but the table, the curves and the targets read the latest row of each cell; the
    older ratios still find their own run's baseline."""
    rep = synthetic([("decode", "decode/matmul", 4096, 1.0, "old"),
                     ("decode", "decode/attnlab", 4096, 1.5, "old"),
                     ("decode", "decode/matmul", 16384, 4.0, "old"),
                     ("decode", "decode/attnlab", 16384, 5.0, "old"),
                     ("decode", "decode/matmul", 4096, 1.0, "new"),
                     ("decode", "decode/attnlab", 4096, 0.9, "new")])
    for row in rep["rows"][:4]:
        row["malloc"] = "default"
    for row in rep["rows"][4:]:
        row["malloc"], row["calls"] = "mmap-off", 20
    rows = rep["rows"]
    assert report_module.latest_rows(rows) == rows[2:]
    target = next(t for t in TARGETS if t.group == "decode" and t.contestant == "decode/attnlab")
    verdict = report_module.evaluate(target, rep)
    # 16k (old run, its own baseline) 0.80x is now the worst; the old 4k 0.67x no longer counts
    assert verdict["value"] == pytest.approx(0.8) and "L=16384" in verdict["text"]
    md = report_module.markdown(rep)
    assert "| decode/attnlab | 900 ms ±0% · 1.11x | 5000 ms ±0% † · 0.80x |" in md
    assert "Timed with the allocator setting `mmap-off`; † with `default`" in md
    assert "mean of 1-20 calls back to back" in md
    assert report_module.curve(rows, "decode/attnlab", "median_s") == ([4096], [0.9])
    failed = {**rows[1], "status": "error", "reason": "out of memory: an old failure"}
    rows.insert(0, failed)  # measured before, then measured fine: not "not measured"
    assert "an old failure" not in report_module.markdown(rep)
    rows.append({**rows[-1], "status": "error", "reason": "out of memory: a new failure"})
    assert "a new failure" in report_module.markdown(rep)
    del rows[0], rows[-1]
    for row in rows:  # one setting throughout: a curve has one point per L, no † anywhere
        row["malloc"] = "mmap-off"
    assert report_module.curve(rows, "decode/attnlab", "median_s") == (
        [4096, 16384], [0.9, 5.0])
    assert "†" not in report_module.markdown(rep)
    for row in rows[:2]:  # only superseded rows of another setting: still no †
        row["malloc"] = "default"
    assert "†" not in report_module.markdown(rep)


def test_fresh_measures_the_given_workloads_again_and_keeps_the_others(tmp_path, monkeypatch):
    measured = []

    def fake_worker(w, names, **kwargs):  # a stub: no process, rows that say which call
        measured.append(w.length)
        return [{"group": w.group, "workload": w.key(), "contestant": n, "status": "ok",
                 "peak_mb": 1.0, "call": len(measured)} for n in names]

    monkeypatch.setattr("attnlab.bench.runner.run_worker", fake_worker)
    short, long_ = workload("decode", length=128), workload("decode", length=256)
    kw = dict(suite="decode", device="cpu", out=tmp_path, contestants=("decode/attnlab",))
    run_suite([short, long_], **kw)
    run_suite([long_], **kw)  # resumes: nothing to measure
    # per workload: the timed rounds, then the peak of each of its two contestants
    assert measured == [128] * 3 + [256] * 3
    rep, _ = run_suite([long_], **kw, fresh=True)
    assert measured[6:] == [256] * 3
    assert len(rep["rows"]) == 4 and len(rep["runs"]) == 2  # (a run measuring nothing unsaved)
    calls = {r["workload"]["length"]: r["measured_together"] for r in rep["rows"]}
    assert calls == {128: "run 0: decode L=128 inference fp32",
                     256: "run 1: decode L=256 inference fp32"}


def test_a_dead_worker_is_an_error_row(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")  # the worker still imports attnlab...
    w = workload("decode", length=64)
    monkeypatch.setattr("attnlab.bench.runner.sys.executable", "/bin/false")
    rep, _ = run_suite([w], suite="decode", device="cpu", out=tmp_path)
    assert {r["status"] for r in rep["rows"]} == {"error"}
    assert all("worker exited with code 1" in r["reason"] for r in rep["rows"])


def test_readme_blocks_are_regenerated_from_the_json(tmp_path):
    rep = synthetic([("scored", "softmax/sdpa", 4096, 0.5, "r"),
                     ("scored", "sigmoid/attnlab", 4096, 1.0, "r")])
    (tmp_path / "r.json").write_text(json.dumps(rep))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench: r.json scored train fp32 -->\nstale\n<!-- /bench -->\n")
    assert report_module.update_readme(readme, tmp_path) == 1
    text = readme.read_text()
    assert "stale" not in text
    assert "| sigmoid/attnlab | 1000 ms (0.50x), 1 MB |" in text


def test_cli_refuses_bad_options_clearly():
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "run", "nosuch"])
    assert result.exit_code == 2 and "unknown suite" in result.output
    result = runner.invoke(main, ["bench", "run", "ops", "--lengths", "4k"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = runner.invoke(main, ["bench", "run", "ops", "--group", "nope"])
    assert result.exit_code == 2 and "unknown group" in result.output
    result = runner.invoke(main, ["bench", "run", "ops", "--device", "nosuchdevice"])
    assert result.exit_code == 2 and "not usable here" in result.output
    result = runner.invoke(main, ["bench", "list"])
    assert result.exit_code == 0 and "neighborhood/natten" in result.output
