"""Reports: mean and 95% CI over seeds, ranking, slices with baselines, self-contained HTML."""

import math

import pytest

from attnlab.arena.report import slice_rows, summarize, table_rows, write_report
from attnlab.arena.stats import mean_ci, t95


def row(label, seed, mse, status="done"):
    return {"sweep": "s", "task": "icl_regression", "label": label, "mechanism": "softmax",
            "seed": seed, "status": status, "params": 100, "wall_time": 2.0,
            "error": None if status == "done" else "RuntimeError: boom\ntrace",
            "config": {"task_params": {"d": 5}, "model": {"heads": 2},
                       "train": {"steps": 10}, "machine": "test machine"},
            "metrics": {"mse": mse} if status == "done" else {},
            "slices": {"10": mse * 2, "40": mse} if status == "done" else {},
            "baselines": {"ridge": {"10": 0.3, "40": 0.12}} if status == "done" else {},
            "curves": {"step": [1, 2], "train_loss": [1.0, mse]} if status == "done" else {}}


def test_mean_ci_uses_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0])[1]) and t95(1000) == 1.96
    assert math.isnan(mean_ci([])[0])


def test_summary_ranks_by_the_metric_and_counts_failures(tmp_path):
    rows = [row("a", 0, 0.5), row("a", 1, 0.7), row("b", 0, 0.2), row("b", 1, 0.4),
            row("c", 0, None, status="failed")]
    summary = summarize(rows)
    header, body = table_rows(summary)
    assert [r[0] for r in body] == ["b", "a", "c"]  # lower mse is better; failed-only last
    assert body[0][2] == f"0.3 ± {t95(1) * math.sqrt(0.02) / math.sqrt(2):.2g}"
    assert "1 failed" in body[2][-3]
    s_header, s_body = slice_rows(summary)
    assert s_header == ["", "10", "40"]
    assert s_body[-1][0] == "ridge (baseline)" and s_body[0][1] == "1.2"
    md, page = write_report(summary, tmp_path / "out")
    text = md.read_text()
    assert "| b | softmax | 0.3 ±" in text and "ridge (baseline)" in text
    assert "c seed 0: RuntimeError: boom" in text and "test machine" in text
    assert (tmp_path / "out" / "slices.png").stat().st_size > 1000
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2  # plots inside the page
    assert "src=\"http" not in html and "<link" not in html  # nothing fetched from outside


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no runs"):
        summarize([])
