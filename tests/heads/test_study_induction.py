"""The known-answer experiment (heads/studies/induction.py): the scores of the known heads on
hand-made attention patterns, the corrupted inputs, the metric, and (slow) the whole
``attnlab heads induction`` on a small trained sweep."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.heads.sites import forward_hooks, sites
from attnlab.heads.studies.induction import (
    answer_metric,
    induction_batch,
    induction_positions,
    induction_scores,
    interpolation,
    known_answer,
    previous_token_scores,
)
from attnlab.tasks import make_task
from attnlab.tasks.tokens import IGNORE


def _batch(size: int = 8, seed: int = 0, **params):
    task = make_task("induction", **{"vocab": 24, "length": 24, "segment": 4, **params})
    batch = induction_batch(task, size, torch.Generator().manual_seed(seed),
                            torch.Generator().manual_seed(seed + 100))
    return task, batch


def _causal_uniform(b: int, h: int, length: int) -> torch.Tensor:
    w = torch.ones(length, length).tril()
    return (w / w.sum(-1, keepdim=True)).expand(b, h, length, length).clone()


def _previous_token_pattern(b: int, length: int) -> torch.Tensor:
    w = torch.zeros(b, length, length)
    w[:, 0, 0] = 1.0
    w[:, torch.arange(1, length), torch.arange(length - 1)] = 1.0
    return w


def _induction_pattern(first: torch.Tensor, second: torch.Tensor, segment: int,
                       length: int) -> torch.Tensor:
    """Uniform causal attention, except at the prediction positions second + j of each
    sequence, which put all their weight on first + j + 1."""
    w = _causal_uniform(len(first), 1, length)[:, 0]
    for row, (f, s) in enumerate(zip(first.tolist(), second.tolist(), strict=True)):
        for j in range(segment - 1):
            w[row, s + j] = 0.0
            w[row, s + j, f + j + 1] = 1.0
    return w


def test_scores_of_hand_made_patterns():
    _, batch = _batch()
    b, length = batch.clean.shape
    w = _causal_uniform(b, 3, length)
    w[:, 1] = _previous_token_pattern(b, length)
    w[:, 2] = _induction_pattern(batch.first, batch.second, batch.segment, length)
    prev = previous_token_scores(w)
    assert prev[1] == 1.0
    # uniform causal attention: 1 / i from position i onto i - 1, averaged over i >= 1
    uniform = sum(1 / (i + 1) for i in range(1, length)) / (length - 1)
    assert prev[0] == pytest.approx(uniform, rel=1e-6)
    ind = induction_scores(w, batch.first, batch.second, batch.segment)
    assert ind[2] == 1.0
    assert ind[1] == 0.0  # a previous-token head looks at second + j - 1, not first + j + 1
    expected = torch.stack([1 / (batch.second + j + 1).float()
                            for j in range(batch.segment - 1)]).mean()
    assert ind[0] == pytest.approx(float(expected), rel=1e-6)


def test_positions_corruption_and_metric():
    task, batch = _batch(size=32)
    m = batch.segment
    for row in range(32):
        f, s = int(batch.first[row]), int(batch.second[row])
        clean, corrupted = batch.clean[row], batch.corrupted[row]
        assert torch.equal(clean[f:f + m], clean[s:s + m]) and f + m <= s
        assert torch.equal(batch.targets[row, s:s + m - 1], clean[s + 1:s + m])
        changed = (clean != corrupted).nonzero().flatten().tolist()
        assert changed == list(range(f, f + m))  # the whole first occurrence, nothing else
        segment = set(clean[s:s + m].tolist())
        assert not segment & set(corrupted[:s].tolist())  # no lookup left before s
        assert int(corrupted.min()) >= 2 and int(corrupted.max()) < task.vocab
    logits = torch.randn(32, batch.clean.shape[1], task.vocab)
    manual = torch.stack([logits[r, int(batch.second[r]) + j, int(batch.targets[
        r, int(batch.second[r]) + j])] for r in range(32) for j in range(m - 1)]).mean()
    assert float(batch.metric(logits)) == pytest.approx(float(manual), rel=1e-6)
    with pytest.raises(ValueError, match="built for 32 sequences"):
        batch.metric(logits[:4])
    first, second = induction_positions(batch.clean, batch.targets)
    assert torch.equal(first, batch.first) and torch.equal(second, batch.second)
    with pytest.raises(ValueError, match="at least one target"):
        induction_positions(batch.clean, torch.full_like(batch.targets, IGNORE))
    with pytest.raises(ValueError, match="has no target"):
        answer_metric(batch.targets, batch.second, m + 1)


def test_known_answer_finds_planted_heads_in_a_model():
    """A random two-layer attention-only model whose layer-0 head 2 is made an exact
    previous-token head and layer-1 head 1 an exact induction head (their weights replaced
    through the hook points): the known answer names those two."""
    task, batch = _batch(size=8)
    torch.manual_seed(0)
    model = task.build_model("softmax", {}, dim=16, depth=2, heads=4, mlp_ratio=0).eval()
    b, length = batch.clean.shape
    planted = {0: (2, _previous_token_pattern(b, length)),
               1: (1, _induction_pattern(batch.first, batch.second, batch.segment, length))}

    def edit(layer):
        head, pattern = planted[layer]

        def hook(_m, _i, w):
            w = w.clone()
            w[:, head] = pattern
            return w
        return hook
    with forward_hooks(sites(model), "weights", {layer: edit(layer) for layer in planted}):
        known = known_answer(model, [batch])
    assert known["previous_head"] == (0, 2) and known["induction_head"] == (1, 1)
    assert known["previous_token"][0, 2] == 1.0 and known["induction"][1, 1] == 1.0


def test_interpolation_ends_at_the_clean_run_and_at_activation_patching():
    from attnlab.heads.patching import activation_patching
    from tests.tolerances import assert_close

    task, batch = _batch(size=8)
    torch.manual_seed(1)
    model = task.build_model("softmax", {}, dim=16, depth=2, heads=2, mlp_ratio=0).eval()
    curve = torch.tensor(interpolation(model, batch, (0, 1), (0.0, 0.5, 1.0)))
    noised = activation_patching(model, batch.clean, batch.corrupted, batch.metric,
                                 point="heads", direction="noise")
    ends = torch.tensor([noised.clean, noised.clean + float(noised.scores[0, 1])])
    assert_close(curve[[0, 2]], ends)
    assert curve[1] != curve[0] and curve[1] != curve[2]


@pytest.mark.slow
def test_heads_induction_command_on_a_small_trained_sweep(tmp_path, induction_sweep):
    from click.testing import CliRunner

    from attnlab.cli import main

    store = induction_sweep(200)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["heads", "induction", "--store", str(store), "--sweep",
                                       "ind", "--batches", "2", "--batch-size", "16", "--out",
                                       str(out)])
    assert result.exit_code == 0, result.output
    numbers = json.loads((out / "results.json").read_text())["induction"]
    assert set(numbers["seeds"]) == {"0", "1"}
    for seed in numbers["seeds"].values():
        assert seed["previous_head"][0] == 0 and seed["induction_head"][0] == 1
        assert {"activation denoise", "activation noise"} <= set(seed["effects"])
        assert seed["clean_metric"] != seed["corrupted_metric"]
    report = (out / "report.md").read_text()
    assert "The known answer per seed" in report and "other heads" in report
    missing = CliRunner().invoke(main, ["heads", "induction", "--store", str(store),
                                        "--sweep", "nothing"])
    assert missing.exit_code == 2 and "no finished run" in missing.output


def test_a_whole_layer_line_and_the_integrated_gradients_method():
    """``interpolation(model, batch, (layer, None))`` moves every head of the layer together:
    at a = 1 it is noising the whole layer (activation patching of its attn_out, an
    attention-only model); ``head_effects`` adds the IG method (steps > 1 only) and times
    every method."""
    from attnlab.heads.patching import activation_patching
    from attnlab.heads.studies.induction import head_effects, ig_name
    from tests.tolerances import assert_close

    task, batch = _batch(size=8)
    torch.manual_seed(1)
    model = task.build_model("softmax", {}, dim=16, depth=2, heads=2, mlp_ratio=0).eval()
    curve = interpolation(model, batch, (0, None), (0.0, 1.0))
    whole = activation_patching(model, batch.clean, batch.corrupted, batch.metric,
                                point="attn_out", direction="noise")
    assert_close(torch.tensor(curve), torch.tensor([whole.clean,
                                                    whole.clean + float(whole.scores[0])]))
    seconds: dict[str, float] = {}
    effects = head_effects(model, batch, ig_steps=3, seconds=seconds)
    names = {f"{m} {d}" for m in ("activation", "attribution", ig_name(3))
             for d in ("denoise", "noise")}
    assert set(effects) == names and set(seconds) == names
    assert all(effects[n].shape == (2, 2) for n in names)
    assert not torch.equal(effects[f"{ig_name(3)} noise"], effects["attribution noise"])
    assert set(head_effects(model, batch, ig_steps=1)) == names - {
        f"{ig_name(3)} denoise", f"{ig_name(3)} noise"}
