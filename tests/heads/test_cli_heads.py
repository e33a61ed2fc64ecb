"""`attnlab heads` on a trained arena run (no extra needed), through click's runner."""

import json

import pytest
from click.testing import CliRunner

from attnlab.arena.config import parse_sweep
from attnlab.arena.store import RunStore
from attnlab.arena.sweep import run_sweep
from attnlab.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "runs"
    sweep = parse_sweep({"task": "copy", "task_params": {"vocab": 6, "length": 4},
                         "model": {"dim": 16, "depth": 2, "heads": 2},
                         "train": {"steps": 20, "batch_size": 8}, "mechanisms": ["softmax"],
                         "seeds": 1, "workers": 1, "store": str(store)})
    run_sweep(sweep)
    with RunStore(store) as db:
        return str(store), db.rows()[0]["key"]


def test_report_on_a_run_key_writes_the_page_figures_and_numbers(trained, tmp_path):
    store, key = trained
    out = tmp_path / "rep"
    result = CliRunner().invoke(main, ["heads", "report", "--model", key[:8], "--store", store,
                                       "--step", "0.25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "results.json").read_text())
    assert len(numbers["importance"]["importance"]) == 2  # layers
    assert numbers["prune"]["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(numbers["prune"]["random_orders"]) == 3
    assert len(numbers["sinks"]["sink_first"][0]) == 2  # heads
    for name in ("attention_maps", "importance", "ablation", "pruning", "sink_first"):
        assert (out / f"{name}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 5 and "Spearman" in page
    assert "Spearman rank correlation" in result.output


def test_capture_lists_names_and_shapes_and_bad_input_is_a_usage_error(trained, tmp_path):
    store, key = trained
    runner = CliRunner()
    ok = runner.invoke(main, ["heads", "capture", "--model", key, "--store", store,
                              "--points", "L1.weights,L0.q", "--out", str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.output
    shapes = {line.split()[0]: line.split("(")[1].split(")")[0]
              for line in ok.output.splitlines() if line.startswith(("L1.weights", "L0.q"))}
    batch, heads, lq, lk = map(int, shapes["L1.weights"].split(", "))
    assert (batch, heads, lq == lk) == (32, 2, True)  # a batch of 32, 2 heads, L x L
    assert shapes["L0.q"] == f"32, 2, {lq}, 8"  # head_dim 16 / 2
    bad_point = runner.invoke(main, ["heads", "capture", "--model", key, "--store", store,
                                     "--points", "L1.weigths"])
    assert bad_point.exit_code == 2 and "did you mean L1.weights" in bad_point.output
    bad_key = runner.invoke(main, ["heads", "sinks", "--model", "0000000", "--store", store])
    assert bad_key.exit_code == 2 and "no run with key" in bad_key.output
    no_store = runner.invoke(main, ["heads", "sinks", "--model", "abc", "--store",
                                    str(tmp_path / "none")])
    assert no_store.exit_code == 2 and "no result store" in no_store.output
    for command in ("capture", "importance", "prune", "sinks", "report"):
        helped = runner.invoke(main, ["heads", command, "--help"])
        assert helped.exit_code == 0 and "Example" in helped.output
