"""Soft injection of task embeddings (heads.injection) on cases whose answers are known: the
embedding is the mean of the heads' last-position outputs, injection is the stated mix of
head outputs (checked against resampling the heads through ``ablate``), and learning the
weights lowers the loss and leaves heads that cannot matter where they started."""

import pytest
import torch

from attnlab import heads as hd
from attnlab.heads.injection import fit_injection, inject, task_embedding
from attnlab.models import TransformerLM


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TransformerLM(11, dim=16, depth=2, heads=2).eval()


def tokens(seed: int, batch: int = 5, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_task_embedding_is_the_mean_last_position_head_output(model):
    few = tokens(1)
    emb = task_embedding(model, lambda: model(few))
    by_prompt = [hd.head_outputs(model, lambda p=p: model(p[None])) for p in few]
    for layer in (0, 1):
        expected = torch.stack([o[layer][0, -1] for o in by_prompt]).mean(0)
        assert emb[layer].shape == (2, 8)
        torch.testing.assert_close(emb[layer], expected)
    at_two = task_embedding(model, lambda: model(few), position=2)
    torch.testing.assert_close(at_two[1], torch.stack([o[1][0, 2] for o in by_prompt]).mean(0))


@pytest.mark.parametrize("layer", [0, 1])
def test_injection_mixes_the_last_position_as_stated(model, layer):
    x, emb = tokens(2), task_embedding(model, lambda: model(tokens(3)))
    alpha = torch.tensor([0.25, 1.0])
    with torch.no_grad(), inject(model, emb, {layer: alpha}):
        injected = model(x)
    original = hd.head_outputs(model, lambda: model(x))[layer]
    mixed = original.clone()
    mixed[:, -1] = (1 - alpha[:, None]) * original[:, -1] + alpha[:, None] * emb[layer]
    with torch.no_grad(), hd.ablate(model, {layer: [0, 1]}, "resample",
                                    values={layer: mixed}):
        expected = model(x)
    torch.testing.assert_close(injected, expected)
    with torch.no_grad():
        plain = model(x)
    torch.testing.assert_close(injected[:, :-1], plain[:, :-1])  # causal: earlier untouched
    assert not torch.allclose(injected[:, -1], plain[:, -1])
    with torch.no_grad(), inject(model, emb, {0: torch.zeros(2), 1: torch.zeros(2)}):
        torch.testing.assert_close(model(x), plain)  # alpha = 0 is the plain model


def test_full_injection_makes_the_heads_output_the_embedding(model):
    x, emb = tokens(4), task_embedding(model, lambda: model(tokens(5)))
    plain = hd.head_outputs(model, lambda: model(x))
    with inject(model, emb, {0: torch.ones(2), 1: torch.ones(2)}):
        seen = hd.head_outputs(model, lambda: model(x))  # its hooks run after injection's
    for layer in (0, 1):
        torch.testing.assert_close(seen[layer][:, -1], emb[layer].expand(5, 2, 8))
        torch.testing.assert_close(seen[layer][:, :-1], plain[layer][:, :-1])


def test_injection_checks_its_weights(model):
    emb = task_embedding(model, lambda: model(tokens(3)))
    with pytest.raises(ValueError, match="weights must be \\(2,\\)"):
        with inject(model, emb, {0: torch.ones(3)}):
            pass
    with pytest.raises(ValueError, match="embedding lacks"):
        with inject(model, {0: emb[0]}, {1: torch.ones(2)}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with inject(model, {**emb, 5: emb[0]}, {5: torch.ones(2)}):
            pass
    with pytest.raises(ValueError, match="init"):
        fit_injection(model, emb, lambda: model(tokens(1)), torch.zeros(5, dtype=torch.long),
                      init=1.0)


def test_fitting_lowers_the_loss_and_leaves_silent_heads_alone(model):
    source, x = tokens(6), tokens(7)
    emb = task_embedding(model, lambda: model(source))
    with torch.no_grad(), inject(model, emb, {0: torch.ones(2), 1: torch.ones(2)}):
        answers = model(x)[:, -1].argmax(-1)  # what full injection predicts
    before = [p.clone() for p in model.parameters()]
    with hd.scale_heads(model, [(1, 1)], 0.0):  # head 1 of layer 1 adds nothing
        fit = fit_injection(model, emb, lambda: model(x), answers, steps=40, init=0.3)
    assert len(fit.losses) == 41 and fit.losses[-1] < fit.losses[0] - 0.1
    assert all(b < a for a, b in zip(fit.losses, fit.losses[1:], strict=False))
    assert fit.weights[1][1].item() == pytest.approx(0.3, abs=1e-6)  # no gradient reaches it
    # the targets are full injection's answers: the other heads move toward alpha = 1
    assert fit.weights[0].min() > 0.8 and fit.weights[1][0] > 0.8
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q) and q.requires_grad  # the model is not trained


@pytest.mark.slow
def test_injection_stands_in_for_demonstrations_on_a_trained_model(tmp_path):
    """A TransformerLM trained on icl_maps (the recorded study's setting, fewer steps):
    zero-shot prompts with the map's embedding injected beat zero-shot and 1-shot prompting,
    and another map's embedding does not help."""
    from attnlab.arena.config import parse_sweep
    from attnlab.arena.sweep import run_sweep
    from attnlab.heads.runs import load_run, saved_runs
    from attnlab.heads.studies.injection import injection_scores, soft

    store = tmp_path / "runs"
    run_sweep(parse_sweep({"name": "maps", "task": "icl_maps", "mechanisms": ["softmax"],
                           "seeds": 1, "workers": 1, "store": str(store),
                           "model": {"dim": 64, "depth": 2, "heads": 4},
                           "train": {"steps": 800, "batch_size": 64, "lr": 1e-3}}))
    loaded = load_run(store, saved_runs(store, "maps")[0]["key"])
    items = injection_scores(loaded.model, loaded.task, few_shots=(1,), prompts=32,
                             draws=2, steps=50)["items"]
    accuracy = {name: float(correct.mean()) for name, (correct, _) in items.items()}
    assert accuracy["zero-shot"] < 0.4 and accuracy["1-shot"] < 0.85
    assert accuracy[soft(1)] > accuracy["1-shot"] + 0.1
    assert accuracy["other map's embedding"] < accuracy["zero-shot"] + 0.05
