"""Fair verdicts: each names the budget and the recipe behind it (mechanism arguments, the
grid searched and the point chosen on validation), says "inconclusive at this budget" when
the 95% interval includes 0 and "equal on every seed" when every paired difference is 0;
the terminal table stays legible at 80 columns. Summaries are built from hand-made rows (no
training)."""

import math

import pytest
from rich.console import Console
from rich.markup import escape

from attnlab.arena.report import delta_text, summarize, table_rows, verdict_lines, verdict_word
from attnlab.arena.stats import paired_difference
from attnlab.cli.arena import _results_table

LONG = "sigmoid-learned-b-qknorm"  # 24 characters


def row(label, seed, value, *, lr=0.001, mechanism=None, kwargs=None, task="mqar",
        status="done", val=None, steps=600):
    """One stored run as ``RunStore.rows`` returns it (test metric ``value``)."""
    metric = "accuracy" if task == "mqar" else "mse"
    done = status == "done"
    return {"sweep": "s", "task": task, "label": label, "mechanism": mechanism or label,
            "seed": seed, "status": status, "params": 1000, "wall_time": 1.0,
            "finished": 1.7e9 + seed, "error": None if done else "RuntimeError: boom",
            "config": {"task_params": {}, "model": {"dim": 64}, "label": label,
                       "kwargs": kwargs or {}, "eval_kwargs": {},
                       "train": {"steps": steps, "batch_size": 64, "lr": lr}},
            "metrics": {metric: value, f"val_{metric}": value if val is None else val}
            if done else {},
            "slices": {}, "baselines": {}, "curves": {}}


def pair(values, reference, task="mqar", **other):
    """Rows of 'other' (test metric per seed: ``values``) and the reference 'ref' (None: no
    run of that seed)."""
    return [row("ref", s, v, task=task) for s, v in enumerate(reference) if v is not None] + \
        [row("other", s, v, task=task, **other) for s, v in enumerate(values) if v is not None]


def only_verdict(rows, **kw):
    lines = verdict_lines(summarize(rows, **kw))
    assert len(lines) == 2 and lines[0].startswith("Budget: ")
    return lines[1]


# ------------------------------------------------------------------ Paired, exactly
def test_equal_and_constant_differences_are_recognised_through_float_rounding():
    equal = paired_difference({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert equal.equal and equal.constant and not equal.decided and equal.half == 0
    # 0.1 three times, but in floats 0.1, 0.09999999999999998 twice: half-width 5e-17
    same = paired_difference({0: 0.2, 1: 0.7, 2: 0.5}, {0: 0.1, 1: 0.6, 2: 0.4})
    assert len(set(same.diffs)) == 2 and same.half > 0
    assert same.constant and not same.equal and same.decided
    lower = paired_difference({0: 0.75, 1: 0.5}, {0: 1.0, 1: 0.75})
    assert lower.half == 0 and lower.mean == -0.25 and lower.decided  # kept: decided
    noisy = paired_difference({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})
    assert not noisy.constant and not noisy.decided
    one = paired_difference({0: 0.5}, {0: 1.0})
    assert one.constant and not one.decided  # one pair decides nothing
    nan = paired_difference({0: math.nan, 1: 0.5, 2: 0.4}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert nan.pairs == 2 and nan.diffs == (-0.5, -0.6)


# ------------------------------------------------------------------ budget and recipe
def test_budget_and_recipe_name_the_grid_the_chosen_points_and_the_mechanism_arguments():
    rows = []
    for seed in range(3):
        for lr, acc in ((0.001, 0.9), (0.003, 0.95)):  # ref: 0.003 better on validation
            rows.append(row("softmax", seed, acc + 0.01 * seed, lr=lr))
        for lr, acc in ((0.001, 0.6), (0.003, 0.5)):  # LONG: 0.001 better on validation
            rows.append(row(LONG, seed, acc + 0.02 * seed, lr=lr, mechanism="sigmoid",
                            kwargs={"learn_bias": True, "qk_norm": True}))
    budget, line = verdict_lines(summarize(rows, ["lr"]))
    assert budget == ("Budget: 600 steps, batch 64, AdamW; each contestant's lr chosen on "
                      "validation from {0.001, 0.003}; 3 seeds.")
    assert line.startswith(f"**{LONG} is worse than softmax** on accuracy (higher is "
                           "better): difference -0.34 [")
    assert line.endswith(f"Recipes: {LONG}: sigmoid(learn_bias=true, qk_norm=true), lr 0.001 "
                         "chosen from {0.001, 0.003}; softmax: lr 0.003 chosen from "
                         "{0.001, 0.003}.")


def test_without_a_grid_the_verdict_says_one_lr_untuned():
    rows = pair([0.5, 0.6, 0.55], [1.0, 0.9, 0.95])
    budget, line = verdict_lines(summarize(rows))
    assert budget == ("Budget: 600 steps, batch 64, AdamW; one lr, 0.001, for every "
                      "contestant, not tuned; 3 seeds.")
    assert line.endswith(" Both at lr 0.001, not tuned.") and "chosen" not in line


def test_a_grid_point_without_runs_and_a_choice_without_validation_are_named():
    rows = [row("ref", s, 0.9, lr=0.001) for s in range(2)] + \
        [row("ref", s, None, lr=0.01, status="failed") for s in range(2)] + \
        [row("other", s, 0.5, lr=lr, val=math.nan) for s in range(2) for lr in (0.001, 0.01)]
    line = only_verdict(rows, grid_keys=["lr"])
    assert ("other: lr 0.001 taken from {0.001, 0.01}: no finite validation accuracy to "
            "choose by; ref: lr 0.001 chosen from {0.001, 0.01} (no finished run at lr "
            "0.01).") in line


# ------------------------------------------------------------------ the wording of each case
def test_an_interval_that_includes_0_is_inconclusive_not_no_difference_nor_worse():
    rows = pair([0.7, 0.5, 0.6], [0.5, 0.7, 0.6])
    line = only_verdict(rows)
    assert line.startswith("other vs ref on accuracy: inconclusive at this budget: "
                           "difference +0 [")
    assert "includes 0" in line and "3 paired seeds" in line
    for word in ("no difference", "worse", "better", "**"):
        assert word not in line
    summary = summarize(rows)
    assert verdict_word(summary, summary.contestant("other")) == "inconclusive"


def test_equal_on_every_seed_is_said_so_without_an_interval_or_a_decision():
    rows = pair([1.0] * 5, [1.0] * 5)
    line = only_verdict(rows)
    assert line == ("other vs ref on accuracy: equal on every seed (5 paired seeds; both 1 on "
                    "each). Both at lr 0.001, not tuned.")
    summary = summarize(rows)
    other = summary.contestant("other")
    assert not other.paired.decided
    assert delta_text(summary, other) == "0 on every seed"
    assert verdict_word(summary, other) == "equal"
    # equal seed by seed, though the seeds differ: no common value to name
    assert only_verdict(pair([0.5, 0.9], [0.5, 0.9])).startswith(
        "other vs ref on accuracy: equal on every seed (2 paired seeds).")


@pytest.mark.parametrize(("task", "values", "reference", "expected"), [
    ("mqar", [0.75, 0.5, 0.7], [1.0, 0.75, 0.95],
     "**other is worse than ref** on accuracy (higher is better): lower by 0.25 on every seed "
     "(3 paired seeds)."),
    ("icl_regression", [0.2, 0.7, 0.5], [0.1, 0.6, 0.4],  # 0.1 up to float rounding
     "**other is worse than ref** on mse (lower is better): higher by 0.1 on every seed "
     "(3 paired seeds)."),
    ("icl_regression", [0.25, 0.5], [0.5, 0.75],
     "**other is better than ref** on mse (lower is better): lower by 0.25 on every seed "
     "(2 paired seeds)."),
])
def test_the_same_difference_on_every_seed_is_decided_and_said_plainly(task, values, reference,
                                                                       expected):
    rows = pair(values, reference, task=task)
    line = only_verdict(rows)
    assert line.startswith(expected) and "[" not in line
    summary = summarize(rows)
    assert delta_text(summary, summary.contestant("other")).endswith(" on every seed")


def test_one_paired_seed_decides_nothing():
    line = only_verdict(pair([0.5], [1.0]))
    assert line.startswith("other vs ref on accuracy: one paired seed only (difference -0.5): "
                           "no interval, nothing decided.")
    summary = summarize(pair([0.5], [1.0]))
    assert verdict_word(summary, summary.contestant("other")) == "–"


def test_seeds_with_a_non_finite_metric_are_left_out_and_named():
    line = only_verdict(pair([math.nan, 0.5, 0.45, 0.45], [1.0, 1.0, 0.9, 0.95]))
    assert "the 95% interval over 3 paired seeds excludes 0; 1 seed left out: a non-finite " \
        "accuracy (other on 1 seed)." in line
    line = only_verdict(pair([math.nan, math.nan], [1.0, math.inf]))
    assert line.startswith("other vs ref on accuracy: nothing to compare, the accuracy is not "
                           "finite on every seed both finished (other on 2 seeds, ref on 1 "
                           "seed).")
    line = only_verdict(pair([None, 0.5], [1.0, None]))  # seeds 1 and 0: none in common
    assert line.startswith("other vs ref on accuracy: nothing to compare, no seed finished "
                           "by both.")


def test_a_contestant_or_a_reference_without_a_finished_run():
    rows = pair([0.5, 0.6], [1.0, 0.9]) + [row("gone", s, None, status="failed")
                                           for s in range(2)]
    summary = summarize(rows, reference="ref")
    lines = verdict_lines(summary)
    assert lines[2].startswith("gone vs ref on accuracy: nothing to compare, gone has no "
                               "finished run (2 runs failed).")
    gone = summary.contestant("gone")
    assert delta_text(summary, gone) == "–" and verdict_word(summary, gone) == "–"
    assert table_rows(summary)[1][2][-3] == "0 (+2 failed)"
    lines = verdict_lines(summarize(rows, reference="gone"))
    assert lines[1:] == ["No verdict: the reference gone has no finished run (2 runs failed)."]
    assert verdict_lines(summarize(rows[:2]))[1] == "One contestant: nothing to compare."


# ------------------------------------------------------------------ the terminal table
def render(summary, width):
    """The table and verdict lines as ``attnlab arena report`` prints them."""
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(_results_table(summary, "s", console))
    table = console.export_text(clear=False)
    for line in verdict_lines(summary):
        console.print(escape(line.replace("**", "")))
    return table, console.export_text()


def grid_summary():
    rows = []
    for seed in range(5):
        for lr in (0.001, 0.003):
            rows.append(row("softmax", seed, 1.0, lr=lr, val=1.0 - (lr == 0.003) * 0.01))
            rows.append(row(LONG, seed, 0.55 + 0.01 * seed + (lr == 0.003) * 0.1, lr=lr,
                            mechanism="sigmoid", kwargs={"learn_bias": True}))
            rows.append(row("mala", seed, 0.9 + 0.02 * (seed % 2), lr=lr))
    return summarize(rows, ["lr"], "softmax")


@pytest.mark.parametrize("width", [80, 120])
def test_the_table_keeps_each_label_whole_and_shows_the_chosen_point(width):
    summary = grid_summary()
    table, text = render(summary, width)
    assert max(map(len, text.splitlines())) <= width and "…" not in text
    for label, lr in (("softmax", "0.001"), (LONG, "0.003"), ("mala", "0.001")):
        lines = [line for line in table.splitlines() if line.split()[:1] == [label]]
        assert len(lines) == 1, (label, table)  # whole, on one line
        assert lr in lines[0].split(), table  # the chosen lr, in its own column
        assert f"{label}: " in " ".join(text.split())  # and its recipe in the verdict lines
    words = table.split()
    for header in ("contestant", "lr", "accuracy", "verdict", "seeds"):
        assert header in words, (header, table)
    flat = " ".join(text.split())  # the verdict lines, unwrapped
    assert f"{LONG}: sigmoid(learn_bias=true), lr 0.003 chosen from {{0.001, 0.003}}" in flat
    if width == 120:  # one line per contestant: mechanism, estimate and interval on it
        line = next(x for x in table.splitlines() if x.startswith(LONG))
        assert "sigmoid" in line.split() and "[" in line and "±" in line


def test_a_narrow_table_drops_columns_but_never_breaks_a_label():
    summary = grid_summary()
    for width in (60, 70):
        table, text = render(summary, width)
        for label in ("softmax", LONG, "mala"):
            assert any(line.split()[:1] == [label] for line in table.splitlines()), table
        assert "lr 0.003 chosen from {0.001, 0.003}" in " ".join(text.split())


def test_at_80_columns_the_seeds_column_goes_before_the_chosen_point_only_when_redundant():
    """Five finished seeds each: the seeds column repeats the budget line and goes first; with
    a failed run it stays, and the chosen lr is left to the verdict lines."""
    rows = []
    for seed in range(5):
        for lr in (0.001, 0.003):
            rows.append(row("softmax", seed, 1.0, lr=lr, val=1.0 - (lr == 0.003) * 0.01))
            rows.append(row(LONG, seed, [1.0, 0.98, 1.0, 0.99, 1.0][seed], lr=lr,
                            mechanism="sigmoid", val=0.9 + (lr == 0.003) * 0.01))
    table, text = render(summarize(rows, ["lr"], "softmax"), 80)
    assert header(table) == ["contestant", "lr", "accuracy", "↑", "Δ", "vs", "softmax",
                             "verdict"]
    assert [line.split()[:2] for line in table.splitlines() if line.startswith(LONG)] == \
        [[LONG, "0.003"]]
    table, text = render(summarize(rows + [row(LONG, 5, None, lr=0.001, status="failed",
                                               mechanism="sigmoid")], ["lr"], "softmax"), 80)
    assert header(table) == ["contestant", "accuracy", "↑", "Δ", "vs", "softmax", "verdict",
                             "seeds"]
    assert max(map(len, text.splitlines())) <= 80
    assert [line.split()[:5] for line in table.splitlines() if line.startswith(LONG)] == \
        [[LONG, "0.994", "-0.006", "inconclusive", "5"]]
    assert "(+1 failed)" in table
    assert f"{LONG}: sigmoid, lr 0.003 chosen from {{0.001, 0.003}};" in " ".join(text.split())


def header(table):
    """The words of the table's header line."""
    return next(line for line in table.splitlines() if line.startswith("contestant")).split()
