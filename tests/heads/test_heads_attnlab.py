"""The microscope on attnlab's own models, each method on a case whose answer is known."""

import math

import pytest
import torch

import attnlab as al
from attnlab import heads as hd
from attnlab.models import TransformerLM


def small_lm(seed: int = 0, depth: int = 2, heads: int = 4) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(vocab=11, dim=32, depth=depth, heads=heads).eval()


def test_sites_list_every_attention_layer_and_bad_names_get_suggestions():
    model = small_lm()
    found = hd.sites(model)
    assert [s.layer for s in found] == [0, 1] and all(s.heads == 4 and s.causal for s in found)
    with pytest.raises(ValueError, match="did you mean L0.weights"):
        with hd.capture(model, ["L0.weight"]):
            pass
    with pytest.raises(ValueError, match="no attention attnlab can reach"):
        hd.sites(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="head 4 out of range in layer 1, which has 4 heads"):
        with hd.ablate(model, [(1, 4)]):
            pass
    with pytest.raises(ValueError, match="layer 2 out of range"):
        with hd.ablate(model, {2: [0]}):
            pass


def test_capture_records_the_tensors_the_model_uses_and_selects_heads():
    model = small_lm()
    tokens = torch.randint(0, 11, (3, 9))
    with torch.no_grad(), hd.capture(model, ["L1.weights", "L1.heads", "L0.q", "L0.k"],
                                     heads=[2]) as cap:
        model(tokens)
        model(tokens[:1])
    assert cap["L1.weights"].shape == (4, 1, 9, 9)  # two forwards joined on the batch axis
    assert cap["L1.heads"].shape == (4, 9, 1, 8) and cap["L0.q"].shape == (4, 1, 9, 8)
    assert cap["L0.k"].shape == (4, 4, 9, 8)  # k keeps every (kv) head
    assert "L1.weights     (3, 1, 9, 9)  x2" in cap.describe()
    attn = model.blocks[1].attn
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), hd.capture(attn, ["L0.weights"]) as cap:
        attn(x)
    torch.testing.assert_close(cap["L0.weights"], attn.weights(x))
    assert not attn.hook_weights.active  # the hooks are gone after the block


def uniform_attention(causal: bool) -> al.Attention:
    """Queries are 0, so every visible key gets the same weight: entropy log(n_visible)."""
    attn = al.build("softmax", dim=8, heads=2, causal=causal)
    with torch.no_grad():
        attn.qkv.q.weight.zero_()
    return attn.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_streamed_statistics_have_the_closed_form_of_uniform_attention(causal):
    attn = uniform_attention(causal)
    length = 6
    x = torch.randn(2, length, 8)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, 4:] = False  # sequence 1 has 4 real tokens
    special = torch.zeros(2, length, dtype=torch.bool)
    special[:, 1] = True
    with torch.no_grad(), hd.capture(attn, aggregate=True) as cap:
        cap.set_batch(key_mask=key_mask, special=special)
        attn(x, mask=key_mask)
    stats = cap.stats[0]
    entropy, distance, first, marked = [], [], [], []
    at_gap: dict[int, list[float]] = {}  # weights of the visible pairs at each token gap
    for n in (length, 4):  # real tokens of each sequence
        for i in range(n):
            seen = list(range(i + 1)) if causal else list(range(n))
            entropy.append(math.log(len(seen)))
            distance.append(sum(abs(i - j) for j in seen) / len(seen))
            first.append(1 / len(seen))
            marked.append((1 in seen) / len(seen))
            for j in seen:
                at_gap.setdefault(abs(i - j), []).append(1 / len(seen))
    for name, values in (("entropy", entropy), ("distance", distance), ("first", first),
                         ("special", marked)):
        expected = torch.full((2,), sum(values) / len(values))
        torch.testing.assert_close(stats.mean(name), expected, msg=name)
    # the sink score of key 0: the mean weight it gets from the queries that see it
    seers = [(n, i) for n in (length, 4) for i in range(n)]
    alpha0 = sum(1 / (i + 1 if causal else n) for n, i in seers) / len(seers)
    torch.testing.assert_close(stats.sink_scores()[:, 0], torch.full((2,), alpha0))
    assert stats.mean_map().shape == (2, length, length)
    gaps = range(max(at_gap) + 1)
    pair = torch.tensor([sum(at_gap[d]) / len(at_gap[d]) for d in gaps])
    share = torch.tensor([sum(at_gap[d]) for d in gaps]) / len(entropy)
    torch.testing.assert_close(stats.distance_profile("pair"), pair.expand(2, -1))
    torch.testing.assert_close(stats.distance_profile("query"), share.expand(2, -1))


def test_streamed_mean_map_equals_the_mean_of_stored_maps_over_batches():
    model = small_lm()
    batches = [torch.randint(0, 11, (2, 7)) for _ in range(3)]
    with torch.no_grad(), hd.capture(model, ["L0.weights"], aggregate=True) as cap:
        for b in batches:
            model(b)
    stored = cap["L0.weights"]
    torch.testing.assert_close(cap.stats[0].mean_map(), stored.mean(0))
    torch.testing.assert_close(cap.stats[0].sink_scores(),
                               hd.sink_scores(stored, torch.ones(7, 7).tril().bool()))


def test_zero_ablation_equals_removing_the_heads_output_projection_columns():
    model = small_lm()
    tokens = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        with hd.ablate(model, {0: [1, 3]}):
            ablated = model(tokens)
        edited = small_lm()
        o = edited.blocks[0].attn.o_proj.weight
        o[:, 8:16] = 0
        o[:, 24:32] = 0
        torch.testing.assert_close(ablated, edited(tokens))
        torch.testing.assert_close(model(tokens), small_lm()(tokens))  # restored


def test_resampling_from_the_same_input_changes_nothing_and_from_another_input_patches():
    model = small_lm()
    a, b = torch.randint(0, 11, (2, 2, 8))
    with torch.no_grad():
        clean = model(a)
        own = hd.head_outputs(model, lambda: model(a))
        with hd.ablate(model, {1: [0, 1, 2, 3]}, "resample", values=own):
            torch.testing.assert_close(model(a), clean)
        other = hd.head_outputs(model, lambda: model(b))
        with hd.ablate(model, {1: [0, 1, 2, 3]}, "resample", values=other):
            patched = hd.head_outputs(model, lambda: model(a))
        torch.testing.assert_close(patched[1], other[1])
        assert not torch.allclose(patched[1], own[1])


def test_mean_ablation_puts_the_dataset_mean_in_every_position():
    model = small_lm()
    runs = [torch.randint(0, 11, (2, 8)) for _ in range(2)]
    means = hd.mean_head_outputs(model, [lambda t=t: model(t) for t in runs])
    stacked = torch.cat([hd.head_outputs(model, lambda t=t: model(t))[0] for t in runs])
    torch.testing.assert_close(means[0], stacked.mean((0, 1)))
    with torch.no_grad(), hd.ablate(model, {0: [2]}, "mean", values=means):
        out = hd.head_outputs(model, lambda: model(runs[0]))[0]
    torch.testing.assert_close(out[:, :, 2], means[0][2].expand(2, 8, -1))
    with pytest.raises(ValueError, match="needs values for layers"):
        with hd.ablate(model, {0: [2]}, "mean"):
            pass


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))


def test_a_head_that_cannot_matter_has_zero_importance_and_zero_ablation_effect():
    model = small_lm()
    with torch.no_grad():
        model.blocks[1].attn.o_proj.weight[:, 16:24] = 0  # head 2 of layer 1 is cut off
    data = [torch.randint(0, 11, (4, 10)) for _ in range(3)]
    imp = hd.head_importance(model, [lambda t=t: lm_loss(model, t) for t in data],
                             normalize=False)
    assert imp.shape == (2, 4) and imp[1, 2] == 0 and (imp > 0).sum() == 7
    base, drop = hd.ablation_scores(model, lambda: lm_loss(model, data[0]).item())
    assert drop[1, 2] == 0 and (drop.abs() > 0).sum() == 7
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert not any(s.module.head_scale.requires_grad for s in hd.sites(model))
    normed = hd.head_importance(model, [lambda t=t: lm_loss(model, t) for t in data])
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(2))


def test_importance_is_the_gradient_of_the_loss_in_the_head_mask():
    """One batch, unnormalised: I_h = |d loss / d xi_h| at xi = 1, checked against a central
    finite difference of the loss in xi_h (head_scale[h] = 1 +- eps)."""
    model = small_lm(seed=3).double()
    tokens = torch.randint(0, 11, (4, 10))
    imp = hd.head_importance(model, [lambda: lm_loss(model, tokens)], normalize=False)
    eps = 1e-6
    scale = hd.sites(model)[1].module.head_scale
    for head in range(4):
        with torch.no_grad():
            scale[head] = 1 + eps
            up = lm_loss(model, tokens).item()
            scale[head] = 1 - eps
            down = lm_loss(model, tokens).item()
            scale[head] = 1
        assert imp[1, head].item() == pytest.approx(abs(up - down) / (2 * eps), rel=1e-5)
    assert hd.rank_correlation(imp, imp) == pytest.approx(1.0)
    assert hd.rank_correlation(imp, -imp) == pytest.approx(-1.0)


def test_pruning_curves_start_full_end_empty_and_follow_the_order():
    model = small_lm()
    tokens = torch.randint(0, 11, (4, 10))

    def metric():
        return -lm_loss(model, tokens).item()

    def importance():
        return hd.head_importance(model, [lambda: lm_loss(model, tokens)])

    guided = hd.pruning_curve(model, metric, step=0.25, importance=importance)
    random_order = hd.pruning_curve(model, metric, step=0.25, seed=1)
    for curve in (guided, random_order):
        assert curve.fractions == [0.0, 0.25, 0.5, 0.75, 1.0] and len(curve.metrics) == 5
        assert sorted(curve.pruned) == [(a, b) for a in range(2) for b in range(4)]
        assert curve.metrics[0] == pytest.approx(metric())  # the model is restored
    assert guided.metrics[-1] == pytest.approx(random_order.metrics[-1])  # all heads gone
    assert guided.order == "importance" and random_order.order == "random"
    assert guided.heads_before(float("-inf")) == 8 and guided.heads_before(1e9) == 0


def test_sink_scores_and_sink_heads_on_a_known_pattern():
    w = torch.zeros(2, 3, 5, 5)
    w[:, 0, :, 0] = 1.0  # head 0: everything on token 0
    w[:, 1] = torch.eye(5)  # head 1: each query on itself
    w[:, 2] = 0.2  # head 2: uniform
    scores = hd.sink_scores(w)
    torch.testing.assert_close(scores[:, 0], torch.tensor([1.0, 0.2, 0.2]))
    heads, share = hd.sink_heads({0: scores, 1: scores}, threshold=0.3)
    assert heads == [(0, 0), (1, 0)] and share == pytest.approx(1 / 3)
    causal = torch.ones(5, 5).tril().bool()
    w_causal = torch.softmax(torch.zeros(5, 5).masked_fill(~causal, -1e9), -1)
    alpha = hd.sink_scores(w_causal[None, None], causal)[0]
    expected = torch.tensor([sum(1 / (q + 1) for q in range(k, 5)) / (5 - k)
                             for k in range(5)])
    torch.testing.assert_close(alpha, expected)


def test_massive_activations_find_the_planted_token_and_dimension():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 1024)
    h[1, 3, 5] = 500.0
    h[0, 2, 9] = -6.0  # large for this token, but phi is about 6, below tau
    found = hd.massive_activations(h)
    assert found.tau == pytest.approx(10.0)  # 20 sqrt(1024 / 4096)
    assert found.dims == [5] and found.tokens.nonzero().tolist() == [[1, 3]]
    assert found.phi[1, 3] > 30 and 5 < found.phi[0].max() < 10
    masked = torch.ones(2, 7, dtype=torch.bool)
    masked[1, 3] = False  # a padded token is never a sink
    assert hd.massive_activations(h, key_mask=masked).tokens.sum() == 0
    assert hd.massive_activations(h, tau=40.0).tokens.sum() == 0


def test_every_attnlab_model_kind_opens_to_the_microscope():
    """Encoder (padded), ViT and ICLRegressor (cross-attention to its context): sites found, the
    captured maps are distributions with no weight on padding, zeroing every head of a layer
    equals cutting its output projection, and importance has one score per head."""
    from attnlab.models import ICLRegressor
    from attnlab.models.encoder import Encoder, ViT

    torch.manual_seed(0)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    icl = (torch.randn(2, 6, 3), torch.randn(2, 6), torch.randn(2, 3))
    cases = [(Encoder(16, depth=2, heads=2).eval(), (torch.randn(2, 7, 16),), {"mask": mask},
              ~mask),
             (ViT(8, 2, 1, 10, dim=16, depth=2, heads=2).eval(),
              (torch.rand(2, 1, 8, 8),), {}, torch.zeros(2, 16, dtype=torch.bool)),
             (ICLRegressor(3, heads=2, depth=2).eval(), icl, {},
              torch.zeros(2, 6, dtype=torch.bool))]  # 7 queries over the 6 context tokens
    for model, args, kwargs, padding in cases:
        found = hd.sites(model)
        assert [(s.layer, s.heads, s.causal) for s in found] == [(0, 2, False), (1, 2, False)]
        with torch.no_grad(), hd.capture(model, ["L1.weights"]) as cap:
            full = model(*args, **kwargs)
        w = cap["L1.weights"]
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert float((w * padding[:, None, None, :]).abs().max()) == 0
        with torch.no_grad(), hd.ablate(model, {1: [0, 1]}):
            ablated = model(*args, **kwargs)
        o_proj = found[1].module.o_proj
        kept = o_proj.weight.detach().clone()
        with torch.no_grad():
            o_proj.weight.zero_()
            cut = model(*args, **kwargs)
            o_proj.weight.copy_(kept)
        torch.testing.assert_close(ablated, cut)
        assert not torch.allclose(ablated, full)
        scores = hd.head_importance(model, [lambda m=model, a=args, k=kwargs:
                                            m(*a, **k).square().mean()])
        assert scores.shape == (2, 2) and bool(torch.isfinite(scores).all())
