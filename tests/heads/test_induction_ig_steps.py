"""``attnlab heads induction --ig-steps N``: the integrated-gradients points of the known-answer
study's attribution method, validated (>= 1), passed to the study and recorded in the report's
command line, setup and results."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attnlab.cli import main


def test_ig_steps_is_validated_and_defaults_to_the_study_constant(tmp_path):
    from attnlab.cli.heads import induction_cmd
    from attnlab.heads.studies.induction import IG_STEPS, induction_study

    option = next(p for p in induction_cmd.params if p.name == "ig_steps")
    assert option.default == IG_STEPS == 16
    for bad in ("0", "-3", "two"):
        result = CliRunner().invoke(main, ["heads", "induction", "--store", str(tmp_path),
                                           "--ig-steps", bad])
        assert result.exit_code == 2 and "--ig-steps" in result.output, result.output
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="ig_steps must be an integer >= 1"):
            induction_study(tmp_path, "nothing", ig_steps=bad)


@pytest.mark.slow
def test_the_study_runs_with_the_steps_asked_and_records_them(tmp_path, induction_sweep):
    """The smallest sweep of the induction tests (two seeds, two heads), trained briefly:
    --ig-steps 3 runs the IG method with 3 points and says so in the command line, the setup
    and results.json; --ig-steps 1 runs plain attribution patching only."""
    from attnlab.heads.studies.induction import ig_name

    store = induction_sweep(20)
    for steps in (3, 1):
        out = tmp_path / f"report{steps}"
        result = CliRunner().invoke(main, [
            "heads", "induction", "--store", str(store), "--sweep", "ind", "--batches", "1",
            "--batch-size", "8", "--ig-steps", str(steps), "--out", str(out)])
        assert result.exit_code == 0, result.output
        numbers = json.loads((out / "results.json").read_text())["induction"]
        assert numbers["ig_steps"] == steps
        methods = set(numbers["seeds"]["0"]["effects"])
        report = (out / "report.md").read_text()
        assert f"--ig-steps {steps}" in report
        assert f"integrated gradients over {steps} points per layer" in report
        if steps > 1:
            assert {f"{ig_name(steps)} noise", f"{ig_name(steps)} denoise"} <= methods
            assert f"{steps} gradient points per layer" in report
        else:
            assert not any("IG" in m for m in methods)
            assert "not run (--ig-steps 1" in report
