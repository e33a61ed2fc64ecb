"""The `attnlab arena` commands, through click's runner."""

from click.testing import CliRunner

from attnlab.arena.config import load_sweep
from attnlab.cli import main
from attnlab.cli_arena import DEFAULT_CONFIG


def test_default_comparison_has_at_least_four_mechanisms():
    sweep = load_sweep(DEFAULT_CONFIG)
    assert len(sweep.variants()) >= 4 and len(sweep.seed_list) >= 2


def test_run_then_report_then_list(tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "runs")
    args = ["arena", "run", "--task", "copy", "--mechanisms", "softmax,sigmoid", "--seeds",
            "1", "--steps", "2", "--workers", "1", "--store", store, "--param", "length=4",
            "--param", "vocab=6", "--no-report"]
    out = runner.invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "2 to run" in out.output and out.output.count("done in") == 2
    again = runner.invoke(main, args)
    assert "2 already in" in again.output and "0 to run" in again.output
    report = runner.invoke(main, ["arena", "report", "--store", store, "--out",
                                  str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    assert "softmax" in report.output and (tmp_path / "rep" / "report.html").exists()
    listing = runner.invoke(main, ["arena", "list", "--store", store])
    assert "copy" in listing.output


def test_clear_errors(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["arena", "run", "--task", "copy"])
    assert out.exit_code == 2 and "--mechanisms" in out.output
    out = runner.invoke(main, ["arena", "run", "--task", "copy", "--mechanisms", "softmax",
                               "--param", "length"])
    assert out.exit_code == 2 and "KEY=VALUE" in out.output
    out = runner.invoke(main, ["arena", "run", "--task", "copy", "--mechanisms", "softmax",
                               "--param", "lenght=3"])
    assert out.exit_code == 2 and "no parameter 'lenght'" in out.output
    out = runner.invoke(main, ["arena", "report", "--store", str(tmp_path / "none")])
    assert out.exit_code == 2 and "no result store" in out.output
    assert not (tmp_path / "none").exists()  # reporting creates nothing
    tasks = runner.invoke(main, ["arena", "tasks"])
    assert tasks.exit_code == 0 and "icl_regression" in tasks.output
