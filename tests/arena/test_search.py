"""Architecture search (``attnlab arena search``): hybrid per-layer designs, their cost, the
Optuna study stored and resumed, runs stored once, the Pareto front and its report."""

import sys

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from attnlab.arena.config import ConfigError, parse_sweep
from attnlab.arena.search import (
    Design,
    SearchError,
    SearchSpace,
    design_sweep,
    measure_cost,
    require_optuna,
    run_search,
    suggest,
)
from attnlab.arena.search_report import points, verdict, write_search_report
from attnlab.arena.store import RunStore
from attnlab.cli import main
from attnlab.models.transformer_lm import TransformerLM

BASE = {"task": "mqar", "task_params": {"vocab": 16, "seq_len": 16, "train_kv": [2],
                                        "eval_kv": [2]},
        "train": {"steps": 3, "batch_size": 4, "curve_points": 3}, "seeds": 1,
        "name": "tiny-search"}
SPACE = SearchSpace(("softmax", "linear"), (1, 2), (16,), (2,))


def base(tmp_path):
    return {**BASE, "store": str(tmp_path / "runs")}


def test_a_hybrid_name_gives_one_mechanism_per_layer():
    model = TransformerLM(10, dim=16, depth=3, heads=2, mechanism="softmax+linear+softmax")
    assert [type(b.attn).__name__ for b in model.blocks] == \
        [type(b.attn).__name__ for b in TransformerLM(
            10, dim=16, depth=3, heads=2, mechanism=["softmax", "linear", "softmax"]).blocks]
    assert type(model.blocks[0].attn) is not type(model.blocks[1].attn)
    parse_sweep({**BASE, "store": "x", "mechanisms": [
        {"mechanism": "softmax+linear", "model": {"depth": 2}}]})
    with pytest.raises(ConfigError, match="2 entries for depth=3"):
        parse_sweep({**BASE, "mechanisms": ["softmax+linear"], "model": {"depth": 3}})
    with pytest.raises(ConfigError, match="unknown attention mechanism 'nope'"):
        parse_sweep({**BASE, "mechanisms": ["softmax+nope"]})


def test_a_space_whose_width_does_not_split_into_heads_is_refused():
    with pytest.raises(ValueError, match="width 20 is not divisible by 3"):
        SearchSpace(("softmax",), (1,), (20,), (2, 3))


def spec_of(layers, **kw):
    return design_sweep({**BASE, "store": "x"}, [Design(layers, 16, 2)]).runs()[0] \
        if not kw else design_sweep({**BASE, "store": "x", **kw},
                                    [Design(layers, 16, 2)]).runs()[0]


def test_costs_count_the_design():
    softmax, linear = spec_of(("softmax", "softmax")), spec_of(("linear", "linear"))
    assert measure_cost(softmax, "params") == measure_cost(linear, "params") > 0
    assert measure_cost(spec_of(("softmax",)), "params") < measure_cost(softmax, "params")
    # the CPU SDPA kernel is counted like the dense reference's two matrix products
    reference = design_sweep({**BASE, "store": "x"}, [Design(("softmax", "softmax"), 16, 2)])
    ref_spec = reference.runs()[0]
    dense = ref_spec.__class__(**{**ref_spec.__dict__, "kwargs": {"backend": "reference"}})
    assert measure_cost(softmax, "flops") == measure_cost(dense, "flops")
    assert measure_cost(softmax, "latency") > 0
    with pytest.raises(ValueError, match="cost must be one of"):
        measure_cost(softmax, "watts")


def trained(study):
    return [t for t in study.trials if t.user_attrs.get("trained")]


def test_the_search_starts_from_the_uniform_designs_and_stores_every_run_once(tmp_path):
    seen = []
    study = run_search(base(tmp_path), SPACE, trials=4, on_trial=lambda n, d, i: seen.append(
        (n, d.mechanism, i["metric"] is not None)))
    assert seen == [(1, "softmax", True), (2, "linear", True), (3, "softmax+softmax", True),
                    (4, "linear+linear", True)]
    assert all(len(t.values) == 2 and t.user_attrs["cost"] == t.values[1]
               for t in trained(study))
    with RunStore(tmp_path / "runs") as store:
        rows = store.rows("tiny-search")
        definition = store.definition("tiny-search")
    assert len(rows) == 4 and {r["mechanism"] for r in rows} == {
        "softmax", "linear", "softmax+softmax", "linear+linear"}
    assert [m["label"] for m in definition["mechanisms"]] == [
        "softmax d16 h2", "linear d16 h2", "softmax+softmax d16 h2", "linear+linear d16 h2"]
    # resumed with a larger budget: two more designs; stored runs are never trained again
    more = run_search(base(tmp_path), SPACE, trials=6)
    assert len(trained(more)) == 6
    with RunStore(tmp_path / "runs") as store:
        rows = store.rows("tiny-search")
    designs = {t.user_attrs["design"] for t in trained(more)}
    assert len(rows) == len(designs)  # a design asked twice reuses its run
    result = CliRunner().invoke(main, ["arena", "report", "--store", str(tmp_path / "runs"),
                                       "--sweep", "tiny-search", "--out",
                                       str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "softmax+softmax d16 h2" in (tmp_path / "report" / "report.md").read_text()


def test_a_trial_left_running_by_a_killed_search_is_asked_again(tmp_path):
    run_search(base(tmp_path), SPACE, trials=1)
    study = optuna.load_study(study_name="tiny-search",
                              storage=f"sqlite:///{tmp_path / 'runs' / 'search.sqlite'}")
    killed = study.ask()  # the second uniform design, drawn, then the process is killed
    suggest(killed, SPACE)
    assert killed.params == {"depth": 1, "dim": 16, "heads": 2, "layer0": "linear"}
    early = study.ask()  # the third, killed before its design was drawn
    resumed = run_search(base(tmp_path), SPACE, trials=4)
    states = {t.number: t.state for t in resumed.trials}
    assert states[killed.number] == states[early.number] == TrialState.FAIL
    assert not any(t.user_attrs.get("trained") for t in resumed.trials
                   if t.number in (killed.number, early.number))
    # no design of the queue is lost: the four uniform designs are trained, once each
    designs = [t.user_attrs["design"] for t in trained(resumed)]
    assert sorted(designs) == sorted(["softmax d16 h2", "linear d16 h2",
                                      "softmax+softmax d16 h2", "linear+linear d16 h2"])


def test_a_search_of_another_definition_is_refused(tmp_path):
    run_search(base(tmp_path), SPACE, trials=1)
    with pytest.raises(SearchError, match="another definition"):
        run_search(base(tmp_path), SPACE, trials=1, cost="params")
    changed = {**base(tmp_path), "train": {**BASE["train"], "steps": 4}}
    with pytest.raises(SearchError, match="another definition"):
        run_search(changed, SPACE, trials=1)


def test_designs_over_the_budget_are_not_trained(tmp_path):
    one_layer = measure_cost(spec_of(("softmax",)), "params")
    study = run_search(base(tmp_path), SPACE, trials=3, cost="params", max_cost=one_layer)
    assert all(t.params["depth"] == 1 for t in trained(study))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs["cost"] > one_layer for t in pruned)


def synthetic_study(values):
    """A study of hand-made trials: design -> (accuracy, cost)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for layers, (metric, cost) in values.items():
        params = {"depth": len(layers), "dim": 16, "heads": 2,
                  **{f"layer{i}": m for i, m in enumerate(layers)}}
        dists = {k: CategoricalDistribution([v]) for k, v in params.items()}
        study.add_trial(create_trial(params=params, distributions=dists,
                                     values=[metric, cost]))
    return study


def test_the_front_holds_exactly_the_undominated_designs(tmp_path):
    study = synthetic_study({
        ("linear",): (0.3, 1.0),                      # cheapest: on the front
        ("softmax",): (0.5, 2.0),                     # on the front
        ("linear", "linear"): (0.4, 3.0),             # dominated by softmax
        ("softmax", "linear"): (0.9, 3.0),            # mixed, on the front
        ("softmax", "softmax"): (0.9, 4.0),           # as good but dearer: dominated
    })
    pts = points(study)
    front = {p.design.mechanism for p in pts if p.on_front}
    assert front == {"linear", "softmax", "softmax+linear"}
    assert [p.cost for p in pts] == sorted(p.cost for p in pts)
    lines = verdict(pts, "accuracy")
    assert "5 designs trained; 3 on the Pareto front" in lines[0]
    assert "Mixed designs on the front: 1 of 3 (softmax+linear d16 h2)" in lines[1]
    md = write_search_report(study, tmp_path, metric="accuracy", higher_is_better=True,
                             cost="flops", setup=["test"])
    text = md.read_text()
    assert "## Pareto front" in text and (tmp_path / "front.png").stat().st_size > 0
    assert (tmp_path / "trials.json").exists()
    no_mixed = synthetic_study({("linear",): (0.3, 1.0), ("softmax", "linear"): (0.2, 3.0)})
    assert verdict(points(no_mixed), "accuracy")[1] == "No mixed design is on the front."


def test_a_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SearchError, match=r"pip install 'attnlab\[search\]'"):
        require_optuna()


def test_the_cli_runs_a_search_and_writes_its_report(tmp_path):
    args = ["arena", "search", "--task", "mqar", "--param", "vocab=16", "--param",
            "seq_len=16", "--param", "train_kv=[2]", "--param", "eval_kv=[2]", "--steps", "2",
            "--train", "batch_size=4", "--trials", "2", "--depths", "1", "--dims", "16",
            "--heads", "2", "--store", str(tmp_path / "runs"), "--out",
            str(tmp_path / "report")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "1. softmax d16 h2" in result.output and "Pareto front" in result.output
    assert "Pareto front" in (tmp_path / "report" / "report.md").read_text()
    bad = CliRunner().invoke(main, [*args[:-4], "--dims", "15"])
    assert bad.exit_code == 2 and "not divisible" in bad.output


def test_a_search_file_with_an_unknown_search_key_is_refused(tmp_path):
    path = tmp_path / "search.toml"
    path.write_text('task = "mqar"\n[search]\nmechanisms = ["softmax"]\nlayers = 3\n')
    result = CliRunner().invoke(main, ["arena", "search", "--config", str(path)])
    assert result.exit_code == 2 and "unknown [search] key 'layers'" in result.output


def test_a_moved_store_still_resumes_its_search(tmp_path):
    import shutil

    run_search(base(tmp_path), SPACE, trials=1)
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    study = run_search({**BASE, "store": str(tmp_path / "moved")}, SPACE, trials=1)
    assert len(trained(study)) == 1


def test_the_search_on_ray_without_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, ["arena", "search", "--task", "mqar", "--param",
                                       "vocab=16", "--param", "seq_len=16", "--param",
                                       "train_kv=[2]", "--param", "eval_kv=[2]", "--steps",
                                       "1", "--trials", "1", "--depths", "1", "--dims", "16",
                                       "--heads", "2", "--store", str(tmp_path),
                                       "--engine", "ray"])
    assert result.exit_code == 1 and "attnlab[ray]" in result.output
