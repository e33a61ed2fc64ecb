"""The `attnlab arena` commands, through click's runner."""

from click.testing import CliRunner

from attnlab.arena.config import load_sweep
from attnlab.cli import main
from attnlab.cli.arena import DEFAULT_CONFIG


def test_default_comparison_has_four_mechanisms_four_seeds_and_twenty_runs():
    """Twenty runs took 4 min 47 s on a 2-core AMD EPYC (docs/results/default/run.log): more
    runs would break the README's promise of a main job under 6 minutes."""
    sweep = load_sweep(DEFAULT_CONFIG)
    assert len(sweep.variants()) >= 4 and len(sweep.seed_list) >= 4
    contestants, rest = len(sweep.variants()), len(sweep.seed_list) - len(sweep.tuning_seeds)
    assert sweep.staged and len(sweep.tuning_runs()) + contestants * rest <= 20


def test_default_comparison_tunes_every_contestant_on_a_learning_rate_grid():
    """One learning rate for all (chosen for softmax) made the first verdicts unfair."""
    assert len(load_sweep(DEFAULT_CONFIG).train.grid().get("lr", [])) >= 2


def test_a_changed_budget_makes_new_runs_and_the_report_never_pools_them(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # the automatic report goes to ./attnlab-reports
    runner = CliRunner()
    store = str(tmp_path / "runs")
    base = ["arena", "run", "--task", "copy", "--seeds", "1", "--workers", "1", "--store",
            store, "--param", "length=4", "--param", "vocab=6", "--name", "s"]
    first = runner.invoke(main, [*base, "--mechanisms", "softmax,sigmoid", "--steps", "2",
                                 "--no-report"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(main, [*base, "--mechanisms", "softmax", "--steps", "3"])
    assert second.exit_code == 0, second.output
    assert "1 to run" in second.output  # another budget: a new run, not the stored one
    assert "2 stored run(s) of earlier configurations" in second.output
    assert "steps=3" in (tmp_path / "attnlab-reports" / "s" / "report.md").read_text()
    from attnlab.arena.store import RunStore

    with RunStore(store) as db:
        assert len(db.rows("s")) == 3 and db.definition("s")["train"]["steps"] == 3
    again = runner.invoke(main, ["arena", "report", "--store", store, "--sweep", "s",
                                 "--out", str(tmp_path / "r")])
    text = (tmp_path / "r" / "report.md").read_text()
    assert again.exit_code == 0 and "steps=3" in text and "steps=2" not in text
    assert "| sigmoid |" not in text  # the earlier configuration's contestant is not shown
    assert "| softmax | softmax | " in text


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
    from attnlab.arena.store import RunStore

    with RunStore(store) as db:
        rows = db.rows()
    keys = {r["label"]: r["key"] for r in rows}
    sweep = runner.invoke(main, ["arena", "list", "--store", store, "--sweep",
                                 rows[0]["sweep"]], terminal_width=120)
    assert sweep.exit_code == 0, sweep.output
    lines = {line.split()[1]: line for line in sweep.output.splitlines()
             if line.split()[1:2] in (["softmax"], ["sigmoid"])}
    for label, key in keys.items():  # each run's short key, and its weights are saved
        assert lines[label].split()[0] == key[:12] and "saved" in lines[label]
    missing = runner.invoke(main, ["arena", "list", "--store", store, "--sweep", "nope"])
    assert missing.exit_code == 2 and "no runs of sweep 'nope'" in missing.output


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


def test_run_report_and_tasks_fit_80_and_120_columns_and_cut_no_value(tmp_path, monkeypatch):
    """At 80 columns the results table puts each interval under its estimate (and leaves the
    mechanism, and if need be the chosen lr, to the verdict lines); at 120 it keeps one line
    per contestant. Either way no line is wider than the terminal, no value is cut short
    with an ellipsis, and each label stays whole on one line."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "wide.toml"
    config.write_text('name = "wide"\ntask = "copy"\nseeds = 2\nreference = "softmax-base"\n'
                      'mechanisms = [{ label = "softmax-base", mechanism = "softmax" },\n'
                      '  { label = "sigmoid-with-a-long-label", mechanism = "sigmoid" }]\n'
                      '[task_params]\nvocab = 6\nlength = 4\n[model]\ndim = 16\ndepth = 1\n'
                      'heads = 2\n[train]\nsteps = 2\nbatch_size = 4\nlr = [0.001, 0.003]\n')
    runner = CliRunner()
    store = str(tmp_path / "runs")
    for width in (80, 120):
        env = {"COLUMNS": str(width)}
        run = runner.invoke(main, ["arena", "run", "--config", str(config), "--store", store,
                                   "--workers", "1"], env=env)
        report = runner.invoke(main, ["arena", "report", "--store", store, "--out",
                                      str(tmp_path / "rep")], env=env)
        tasks = runner.invoke(main, ["arena", "tasks"], env=env)
        for result in (run, report, tasks):
            assert result.exit_code == 0, result.output
            lines = result.output.splitlines()
            assert max(map(len, lines)) <= width and "…" not in result.output
        table, _, verdicts = report.output.partition("Budget: ")
        lines = table.splitlines()
        for label in ("softmax-base", "sigmoid-with-a-long-label"):
            assert any(line.split()[:1] == [label] for line in lines), (width, table)
        for value in ("(reference)", "Δ", "verdict"):  # seeds: at 80, the budget line's
            assert value in table.split(), (width, value, table)
        flat = " ".join(verdicts.split())  # the verdict lines, unwrapped
        assert flat.startswith("2 steps, batch 4, AdamW; each contestant's lr chosen on "
                               "validation from {0.001, 0.003}; 2 seeds.")
        assert "sigmoid-with-a-long-label: sigmoid, lr 0.00" in flat
        assert "softmax-base: softmax, lr 0.00" in flat
        if width == 120:  # label, mechanism, chosen lr, estimate and interval on one line
            line = next(x for x in lines if x.startswith("sigmoid-with-a-long-label"))
            assert line.split()[1:3] in (["sigmoid", "0.001"], ["sigmoid", "0.003"])
            assert "[" in line and "±" in line and "seeds" in table.split()
        words = tasks.output.split()
        assert "icl_regression" in words and "length_extrapolation" in words
        for param in ("eval_contexts=", "multiples=", "sink_threshold="):
            assert any(w.startswith(param) for w in words), (width, param)
