"""Reports: mean and 95% CI over seeds (exact t), paired differences to a reference, the
tuning grid chosen on validation, no pooling of configurations, self-contained HTML."""

import math
import statistics

import pytest

from attnlab.arena.report import (
    grid_rows,
    seed_rows,
    slice_rows,
    summarize,
    table_rows,
    verdict_lines,
    write_report,
)
from attnlab.arena.stats import mean_ci, paired_difference, t_quantile


def row(label, seed, mse, status="done", lr=0.01, steps=10, val=None):
    done = status == "done"
    return {"sweep": "s", "task": "icl_regression", "label": label, "mechanism": "softmax",
            "seed": seed, "status": status, "params": 100, "wall_time": 2.0,
            "finished": 1.7e9 + seed,
            "error": None if done else "RuntimeError: boom\ntrace",
            "config": {"task_params": {"d": 5}, "model": {"heads": 2}, "label": label,
                       "train": {"steps": steps, "lr": lr}, "machine": "test machine",
                       "provenance": {"command": "attnlab arena run --x", "attnlab": "0.1.0",
                                      "commit": "abc"}},
            "metrics": {"mse": mse, "val_mse": mse if val is None else val} if done else {},
            "slices": {"10": mse * 2, "40": mse} if done else {},
            "baselines": {"ridge": {"10": 0.3, "40": 0.12}} if done else {},
            "curves": {"step": [1, 2], "train_loss": [1.0, mse]} if done else {}}


def test_t_quantiles_are_exact_not_a_table():
    assert t_quantile(1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_quantile(4) == pytest.approx(2.7764451, rel=1e-7)
    assert t_quantile(1000) == pytest.approx(1.9623391, rel=1e-7)  # not 1.96
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(t_quantile(2) / math.sqrt(3))
    assert math.isnan(mean_ci([5.0])[1]) and math.isnan(mean_ci([])[0])


def test_paired_difference_uses_the_seeds_both_have():
    ref = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}
    other = {0: 1.5, 1: 2.4, 2: 3.6}  # seed 3 missing: not paired
    p = paired_difference(other, ref)
    diffs = [0.5, 0.4, 0.6]
    assert p.pairs == 3 and p.mean == pytest.approx(0.5)
    assert p.half == pytest.approx(t_quantile(2) * statistics.stdev(diffs) / math.sqrt(3))
    assert p.decided  # 0.5 ± 0.25 excludes 0
    # the unpaired intervals overlap, yet the paired one decides: the point of pairing
    assert mean_ci([1.5, 2.4, 3.6])[0] - mean_ci([1.5, 2.4, 3.6])[1] < 3.0
    noisy = paired_difference({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})
    assert not noisy.decided


def test_table_keeps_config_order_and_gives_paired_differences(tmp_path):
    rows = [row("a", 0, 0.5), row("a", 1, 0.7), row("a", 2, 0.6),
            row("b", 0, 0.2), row("b", 1, 0.41), row("b", 2, 0.3),
            row("c", 0, None, status="failed")]
    summary = summarize(rows)
    header, body = table_rows(summary)
    assert [r[0] for r in body] == ["a", "b", "c"]  # not ranked
    assert header[3] == "Δ vs a" and body[0][3] == "(reference)"
    p = summary.contestant("b").paired
    assert p.mean == pytest.approx(-0.2966666, rel=1e-5) and p.decided
    assert header[4] == "verdict" and body[1][4] == "better" and "1 failed" in body[2][-3]
    half = t_quantile(2) * statistics.stdev([.2, .41, .3]) / math.sqrt(3)
    assert body[1][2] == f"0.3033 ± {half:.2g}"
    verdict = verdict_lines(summary)
    assert verdict[0] == "Budget: 10 steps, AdamW; one lr, 0.01, for every contestant, not " \
        "tuned; 3 seeds."
    assert verdict[1].startswith("**b is better than a**")
    assert verdict[2] == "c vs a on mse: nothing to compare, c has no finished run (1 run " \
        "failed). Recipes: c: softmax; a: softmax; both at lr 0.01, not tuned."
    s_header, s_body = slice_rows(summary)
    assert s_header == ["", "10", "40"] and s_body[-1][0] == "ridge (baseline)"
    assert s_body[0][2].startswith("0.6 ±")  # slices carry intervals too
    assert seed_rows(summary)[1][1] == ["b", "0.2", "0.41", "0.3"]
    md, page = write_report(summary, tmp_path / "out")
    text = md.read_text()
    assert "| b | softmax | 0.3033 ±" in text and "ridge (baseline)" in text
    assert "c seed 0: RuntimeError: boom" in text and "test machine" in text
    assert "runs made by: `attnlab arena run --x`" in text and "commit abc" in text
    assert "report written by:" in text
    assert (tmp_path / "out" / "slices.png").stat().st_size > 1000
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2  # plots inside the page
    assert "src=\"http" not in html and "<link" not in html  # nothing fetched from outside


def test_overlapping_intervals_are_not_called_a_difference():
    rows = [row("a", s, v) for s, v in enumerate([0.5, 0.7, 0.6])] + \
           [row("b", s, v) for s, v in enumerate([0.7, 0.5, 0.6])]
    summary = summarize(rows)
    assert table_rows(summary)[1][1][4] == "inconclusive"
    assert "inconclusive at this budget" in verdict_lines(summary)[1]


def test_grid_point_is_chosen_on_validation_never_on_test():
    # lr=0.1 has the better test mse but the worse validation mse: it must not be chosen
    rows = [row("a", s, 0.9, lr=0.01, val=0.2) for s in range(3)] + \
           [row("a", s, 0.1, lr=0.1, val=0.5) for s in range(3)]
    summary = summarize(rows, grid_keys=["lr"])
    a = summary.contestant("a")
    assert a.chosen.values == {"lr": 0.01} and a.metrics["mse"][0] == pytest.approx(0.9)
    header, body = grid_rows(summary)
    assert header[:2] == ["contestant", "lr"]
    assert [r[-1] for r in body] == ["✓", ""] and body[0][1] == "0.01"
    assert table_rows(summary)[0][2] == "chosen" and table_rows(summary)[1][0][2] == "lr=0.01"


def test_runs_of_different_budgets_are_never_pooled():
    rows = [row("a", 0, 0.5, steps=20), row("a", 0, 0.4, steps=30)]
    with pytest.raises(ValueError, match="different configurations"):
        summarize(rows)


def test_no_rows_and_unknown_reference_are_errors():
    with pytest.raises(ValueError, match="no runs"):
        summarize([])
    with pytest.raises(ValueError, match="reference 'z' is not a contestant"):
        summarize([row("a", 0, 0.5)], reference="z")


def test_user_text_is_escaped_in_every_format(tmp_path):
    """A label with HTML, a table separator and matplotlib math text ($\\notacommand$ made
    every report fail) shows as written in Markdown, HTML and the plots."""
    label = "<b>x</b>|$\\notacommand$"
    rows = [row("a", s, 0.5 + 0.1 * s) for s in range(3)] + \
        [row(label, s, 0.2 + 0.1 * s) for s in range(3)]
    md, page = write_report(summarize(rows), tmp_path)
    text = md.read_text()
    assert "<b>" not in text and "&lt;b&gt;x&lt;/b&gt;\\|$\\notacommand$" in text
    assert "<b>x</b>" not in page.read_text()
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_reports_are_written_atomically_and_never_through_a_symlink(tmp_path, monkeypatch):
    summary = summarize([row("a", s, 0.5 + 0.1 * s) for s in range(3)])
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.md"
    target.write_text("keep me")
    (out / "report.md").symlink_to(target)
    write_report(summary, out)
    assert target.read_text() == "keep me" and not (out / "report.md").is_symlink()
    # a write that fails half-way leaves the previous report whole and no temporary file
    before = (out / "report.html").read_text()
    import os as os_module

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os_module, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_report(summary, out)
    assert (out / "report.html").read_text() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["../../x", "/abs", ".hidden", "a/b", ""])
def test_a_sweep_name_cannot_leave_the_output_folder(name):
    from attnlab.arena.config import ConfigError, parse_sweep

    with pytest.raises(ConfigError, match="plain name"):
        parse_sweep({"task": "copy", "mechanisms": ["softmax"], "name": name})
