"""`attnlab heads` on a trained arena run (no extra needed), through click's runner."""

import json

import pytest
from click.testing import CliRunner

from attnlab.arena.config import parse_sweep
from attnlab.arena.store import RunStore
from attnlab.arena.sweep import run_sweep
from attnlab.cli import main


def one_run(folder, task: str, params: dict, batch_size: int) -> tuple[str, str]:
    """A 20-step softmax run of ``task`` (dim 16, 2 layers x 2 heads): (store, key)."""
    store = folder / "runs"
    run_sweep(parse_sweep({"task": task, "task_params": params,
                           "model": {"dim": 16, "depth": 2, "heads": 2},
                           "train": {"steps": 20, "batch_size": batch_size},
                           "mechanisms": ["softmax"], "seeds": 1, "workers": 1,
                           "store": str(store)}))
    with RunStore(store) as db:
        return str(store), db.rows()[0]["key"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return one_run(tmp_path_factory.mktemp("store"), "copy", {"vocab": 6, "length": 4}, 8)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return one_run(tmp_path_factory.mktemp("vit"), "digits", {"patch_size": 2}, 16)


def test_patterns_on_a_vit_run_measure_patch_distances_and_cluster_the_heads(vit_run,
                                                                             tmp_path):
    store, key = vit_run
    out = tmp_path / "pat"
    runner = CliRunner()
    result = runner.invoke(main, ["heads", "patterns", "--model", key, "--store", store,
                                  "--clusters", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "results.json").read_text())["patterns"]
    assert numbers["unit"] == "patches" and numbers["k"] == 2
    # a 4 x 4 patch grid: Chebyshev distances 0..3 (token gaps would run to 15)
    assert [len(h) for h in numbers["strength_per_pair"]["0"]] == [4, 4]
    assert set(numbers["clusters"]) == {0, 1}
    assert len(numbers["heads"]) == 4 and len(numbers["kinds"]) == 2
    for name in ("strength", "patterns", "clusters", "dendrogram"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "mean attention distance by layer" in result.output
    too_many = runner.invoke(main, ["heads", "patterns", "--model", key, "--store", store,
                                    "--clusters", "9", "--out", str(tmp_path / "bad")])
    assert too_many.exit_code == 2 and "k must be between 1 and the number of heads (4)" \
        in too_many.output


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
    assert numbers["patterns"]["unit"] == "tokens" and len(numbers["patterns"]["heads"]) == 4
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
