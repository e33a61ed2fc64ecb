"""Weight edits of chosen heads (modulation toward a group, VAR redistribution, SoftPAG) and
perturbation guidance with HeadHunter, on cases whose answers are known."""

import pytest
import torch

import attnlab as al
from attnlab import heads as hd
from attnlab.heads.guidance import guided, head_hunter
from attnlab.heads.steer import edit_weights, redistribute, shift_toward, toward_identity
from attnlab.models import TransformerLM


def causal_weights(seed: int = 0, b: int = 2, h: int = 3, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, length, length, generator=g)
    future = torch.ones(length, length).triu(1).bool()
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def test_shift_toward_a_group_raises_its_mass_by_the_requested_share():
    w = causal_weights()
    group = torch.zeros(2, 7, dtype=torch.bool)
    group[0, [2, 5]] = True
    group[1, [0]] = True
    out = shift_toward(w, group, 0.4)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 7))  # rows still sum to 1
    g = group[:, None, None, :].float()
    before, after = (w * g).sum(-1), (out * g).sum(-1)
    seen = before > 0  # rows 0 and 1 of sequence 0 see no group key: unchanged
    torch.testing.assert_close(after[seen], (before + 0.4 * (1 - before))[seen])
    torch.testing.assert_close(out[~seen], w[~seen])
    assert bool((out[..., torch.ones(7, 7).triu(1).bool()] == 0).all())  # no weight on the future
    # proportions are kept inside the group and outside it
    ratio_in = out[0, :, 6, 2] / out[0, :, 6, 5]
    torch.testing.assert_close(ratio_in, w[0, :, 6, 2] / w[0, :, 6, 5])
    ratio_out = out[0, :, 6, 1] / out[0, :, 6, 3]
    torch.testing.assert_close(ratio_out, w[0, :, 6, 1] / w[0, :, 6, 3])
    torch.testing.assert_close(shift_toward(w, group, 0.0), w)
    everything = (shift_toward(w, group, 1.0) * g).sum(-1)
    torch.testing.assert_close(everything[seen], torch.ones_like(everything[seen]))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        shift_toward(w, group, 1.5)
    with pytest.raises(ValueError, match="key mask"):
        shift_toward(w, torch.ones(6, dtype=torch.bool), 0.1)


def test_redistribution_moves_the_sinks_share_onto_the_targets():
    w = causal_weights(1)
    sinks = torch.zeros(7, dtype=torch.bool)
    sinks[0] = True
    targets = torch.zeros(7, dtype=torch.bool)
    targets[[3, 4]] = True
    out = redistribute(w, sinks, targets, 0.5)
    torch.testing.assert_close(out.sum(-1), w.sum(-1))
    torch.testing.assert_close(out[..., 4:, 0], 0.5 * w[..., 4:, 0])  # rows that see 3, 4
    gained = out[..., 4:, 3:5].sum(-1) - w[..., 4:, 3:5].sum(-1)
    torch.testing.assert_close(gained, 0.5 * w[..., 4:, 0])
    torch.testing.assert_close(out[..., 4:, 1:3], w[..., 4:, 1:3])  # others untouched
    torch.testing.assert_close(out[..., :3, :], w[..., :3, :])  # no target visible yet
    with pytest.raises(ValueError, match="overlap"):
        redistribute(w, sinks, sinks, 0.5)


def test_toward_identity_and_its_effect_on_a_layer():
    w = causal_weights(2)
    torch.testing.assert_close(toward_identity(w, 0.0), w)
    torch.testing.assert_close(toward_identity(w, 1.0), torch.eye(7).expand_as(w))
    half = toward_identity(w, 0.5)
    torch.testing.assert_close(half.sum(-1), torch.ones(2, 3, 7))
    tail = toward_identity(w[..., 4:, :], 1.0)  # 3 queries at the end of 7 keys
    assert tail[0, 0].argmax(-1).tolist() == [4, 5, 6]
    # a layer whose heads all look at themselves outputs each head's own value
    torch.manual_seed(0)
    attn = al.build("softmax", dim=16, heads=4, kv_heads=2, causal=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), hd.capture(attn, ["L0.v", "L0.heads"]) as cap, \
            edit_weights(attn, {0: [0, 1, 2, 3]}, lambda a: toward_identity(a, 1.0)):
        attn(x)
    v = cap["L0.v"].repeat_interleave(2, dim=1)  # GQA: 2 query heads per kv head
    torch.testing.assert_close(cap["L0.heads"], v.transpose(1, 2))


def test_edit_weights_touches_only_the_chosen_heads_and_the_identity_edit_changes_nothing():
    torch.manual_seed(1)
    model = TransformerLM(vocab=11, dim=32, depth=2, heads=4).eval()
    tokens = torch.randint(0, 11, (2, 9))
    with torch.no_grad(), hd.capture(model, ["L1.heads"]) as plain:
        logits = model(tokens)
    with torch.no_grad(), edit_weights(model, {1: [0, 1, 2, 3]}, lambda w: w):
        same = model(tokens)  # the weights path (w @ v) equals the fast path
    torch.testing.assert_close(same, logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), hd.capture(model, ["L1.heads"]) as cap, \
            edit_weights(model, [(1, 2)], lambda w: toward_identity(w, 1.0)):
        model(tokens)
    changed = (cap["L1.heads"] - plain["L1.heads"]).abs().amax((0, 1, 3))
    assert changed[2] > 1e-3 and float(changed[[0, 1, 3]].max()) < 1e-5
    with pytest.raises(ValueError, match="the edit returned"):
        with torch.no_grad(), edit_weights(model, [(0, 0)], lambda w: w[:, :, :1]):
            model(tokens)


def test_guidance_is_the_plain_output_at_scale_zero_and_headhunter_finds_the_head_that_acts():
    torch.manual_seed(2)
    model = TransformerLM(vocab=11, dim=32, depth=1, heads=4).eval()
    tokens = torch.randint(0, 11, (2, 9))

    def run():
        return model(tokens)
    with torch.no_grad():
        plain = run()
    torch.testing.assert_close(guided(model, run, [(0, 1)], scale=0.0), plain)
    with torch.no_grad():
        model.blocks[0].attn.head_scale[[0, 1, 3]] = 0  # only head 2 reaches the output
    with torch.no_grad():
        only = run()
        with edit_weights(model, [(0, 2)], lambda w: toward_identity(w, 0.5)):
            weak = run()
    moved = guided(model, run, [(0, 0), (0, 3)], scale=2.0)
    torch.testing.assert_close(moved, only)  # perturbing silent heads changes nothing
    pushed = guided(model, run, [(0, 2)], strength=0.5, scale=1.5)
    torch.testing.assert_close(pushed, only + 1.5 * (only - weak))  # away from the weak one

    def objective(out):
        return float((out - only).abs().mean())
    hunt = head_hunter(model, run, objective, 2)
    assert hunt.chosen[0] == (0, 2) and hunt.start == pytest.approx(0.0)
    assert hunt.scores[0] > 1e-3 and hunt.scores[1] == pytest.approx(hunt.scores[0])
    with pytest.raises(ValueError, match="count must be between 1 and the 4"):
        head_hunter(model, run, objective, 5)
