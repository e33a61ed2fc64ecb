"""Sweeps with ``tune_seeds``: the grid trains on the first seeds only, each contestant's point
best on their validation metric then trains on the other seeds; the choice never looks at
the other seeds, an interrupted sweep resumes at the stage it stopped in, and the report
says on which seeds it chose."""

import pytest

from attnlab.arena.config import ConfigError, parse_sweep
from attnlab.arena.report import budget_line, grid_rows, setup_lines, summarize
from attnlab.arena.store import RunStore
from attnlab.arena.summary import summarize_sweep
from attnlab.arena.sweep import run_sweep, sweep_rows

from .test_report import row

TINY = {"task": "copy", "task_params": {"vocab": 6, "length": 4},
        "model": {"dim": 16, "depth": 1, "heads": 2},
        "train": {"steps": 3, "batch_size": 4, "curve_points": 3, "lr": [0.001, 0.01]}}


def staged(tmp_path, **extra):
    return parse_sweep({**TINY, "mechanisms": ["softmax", "sigmoid"], "seeds": 3,
                        "tune_seeds": 1, "workers": 1, "store": str(tmp_path / "runs"),
                        **extra})


def test_tune_seeds_is_checked_against_the_seeds():
    with pytest.raises(ConfigError, match=r"tune_seeds \(4\) cannot exceed the number of "
                                          r"seeds \(3\)"):
        parse_sweep({**TINY, "mechanisms": ["softmax"], "seeds": 3, "tune_seeds": 4})
    with pytest.raises(ConfigError, match="tune_seeds"):
        parse_sweep({**TINY, "mechanisms": ["softmax"], "seeds": 3, "tune_seeds": 0})
    one_point = parse_sweep({**TINY, "mechanisms": ["softmax"], "seeds": 3, "tune_seeds": 1,
                             "train": {**TINY["train"], "lr": 0.01}})
    assert not one_point.staged  # nothing to tune: every seed at once
    assert len(one_point.tuning_runs()) == 3


def test_the_grid_trains_on_the_tuning_seeds_and_the_chosen_point_on_the_rest(tmp_path):
    sweep = staged(tmp_path)
    plans = []
    summary = run_sweep(sweep, listener=lambda e, spec, p: plans.append(p) if e == "plan"
                        else None)
    # stage 1: 2 contestants x 2 lrs x seed 0; stage 2: 2 contestants x seeds 1, 2
    assert [(p.stage, len(p.todo)) for p in plans] == [("tune", 4), ("confirm", 4)]
    assert (summary.total, summary.done, summary.failed) == (8, 8, 0)
    with RunStore(sweep.store) as store:
        rows = sweep_rows(store, sweep)
    assert len(rows) == 8
    tuned = summarize([r for r in rows if r["seed"] == 0], ["lr"])
    result = summarize_sweep(rows, sweep)
    for c in result.contestants:
        best = tuned.contestant(c.label).chosen.values
        assert c.chosen.values == best  # chosen on seed 0 alone
        assert sorted(r["seed"] for r in c.chosen.runs) == [0, 1, 2]
        other = next(p for p in c.points if p is not c.chosen)
        assert [r["seed"] for r in other.runs] == [0]  # never trained on seeds 1, 2
    again = run_sweep(sweep)
    assert (again.done, again.skipped) == (0, 8)


def test_an_interrupted_sweep_resumes_in_the_stage_it_stopped_in(tmp_path):
    sweep = staged(tmp_path)

    def stop_at_stage_two(event, spec, payload):
        if event == "plan" and payload.stage == "confirm":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, listener=stop_at_stage_two)
    with RunStore(sweep.store) as store:
        assert len(sweep_rows(store, sweep)) == 4  # the tuning runs are kept
    resumed = run_sweep(sweep)
    assert (resumed.skipped, resumed.done) == (4, 4)


def test_the_choice_reads_the_tuning_seeds_validation_only():
    # lr 0.1 is better on seed 0's validation, worse on the other seeds' (which only the
    # chosen point has): the choice must not compare means over different seeds
    rows = [row("a", 0, 0.5, lr=0.1, val=0.10), row("a", 0, 0.5, lr=0.01, val=0.20),
            row("a", 1, 0.5, lr=0.1, val=0.90), row("a", 2, 0.5, lr=0.1, val=0.90)]
    assert summarize(rows, ["lr"], tuning_seeds=[0]).contestant("a").chosen.values == \
        {"lr": 0.1}
    assert summarize(rows, ["lr"]).contestant("a").chosen.values == {"lr": 0.01}


def test_the_report_says_on_which_seeds_it_chose():
    rows = [row(label, s, 0.5, lr=lr) for label in ("a", "b") for s in (0, 1, 2)
            for lr in (0.01, 0.1) if s == 0 or lr == 0.01]
    summary = summarize(rows, ["lr"], tuning_seeds=[0])
    assert "lr chosen on validation (seed 0) from {0.01, 0.1}; 3 seeds" in \
        budget_line(summary)
    header, body = grid_rows(summary)
    assert header[2] == "validation mse (seed 0)"
    assert [r[-2:] for r in body if r[0] == "a"] == [["3", "✓"], ["1", ""]]
    assert "tuned per contestant on the validation split of seed 0 (never the test): lr in " \
        "[0.01, 0.1]; the chosen point then trained on the other seeds" in setup_lines(summary)
    assert "(seed" not in budget_line(summarize(rows, ["lr"]))


def test_the_command_line_says_both_stages(tmp_path):
    from click.testing import CliRunner

    from attnlab.cli import main

    config = tmp_path / "staged.toml"
    config.write_text('task = "copy"\nmechanisms = ["softmax"]\nseeds = 3\ntune_seeds = 1\n'
                      'workers = 1\n[task_params]\nvocab = 6\nlength = 4\n'
                      '[model]\ndim = 16\ndepth = 1\nheads = 2\n'
                      '[train]\nsteps = 2\nbatch_size = 4\nlr = [0.001, 0.01]\n')
    out = CliRunner().invoke(main, ["arena", "run", "--config", str(config), "--store",
                                    str(tmp_path / "runs"), "--no-report"],
                             env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "in two stages (tune_seeds = 1)" in text
    assert "stage 1 of 2: 1 contestants x 2 grid points x 1 seed = 2 runs" in text
    assert "stage 2 of 2: each contestant's chosen point on the other 2 seeds = 2 runs" in text
    assert text.count("done in") == 4
