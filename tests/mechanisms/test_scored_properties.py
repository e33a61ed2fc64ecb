"""The property checks of the scored mechanisms (docs/mechanisms/)."""

import math

import pytest
import torch

import attnlab as al
from attnlab.mechanisms.selective import Temperature
from attnlab.ops import sigmoid_attention, sigmoid_weights, softmax_weights, softplus_weights


# ----------------------------------------------------------------------------- sigmoid
@pytest.mark.parametrize("n", [16, 256, 2048])
def test_sigmoid_rows_sum_to_n_over_n_plus_1_with_bias_and_n_over_2_without(n):
    q = torch.zeros(1, 1, 1, 8, dtype=torch.float64)  # q.k = 0
    k = torch.randn(1, 1, n, 8, dtype=torch.float64)
    with_bias = sigmoid_weights(q, k, scale=1.0, bias=-math.log(n)).sum(-1)
    without = sigmoid_weights(q, k, scale=1.0, bias=0.0).sum(-1)
    torch.testing.assert_close(with_bias, torch.full_like(with_bias, n / (n + 1)))
    torch.testing.assert_close(without, torch.full_like(without, n / 2))


def test_sigmoid_output_norm_is_independent_of_n_with_the_bias():
    def out_norm(n, bias):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 1, 4, 16, generator=g) * 0.01
        k = torch.randn(1, 1, n, 16, generator=g)
        v = 1.0 + 0.1 * torch.randn(1, 1, n, 16, generator=g)
        return sigmoid_attention(q, k, v, bias=bias).norm().item()
    biased = out_norm(2048, None) / out_norm(64, None)
    unbiased = out_norm(2048, 0.0) / out_norm(64, 0.0)
    assert 0.9 < biased < 1.1
    assert unbiased > 25  # grows like n without the bias


def test_sigmoid_masked_entries_are_exactly_zero():
    attn = al.build("sigmoid", dim=16, heads=2, causal=True)
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, 2] = False
    w = attn.weights(torch.randn(1, 6, 16), mask=keep)
    assert (w[..., 2] == 0).all()
    assert (w.triu(1) == 0).all()
    assert (w.tril()[..., [0, 1, 3]] > 0).any()


def test_sigmoid_causal_module_uses_a_fixed_bias_and_requires_max_len():
    attn = al.build("sigmoid", dim=16, heads=2, causal=True, max_len=4096)
    assert attn.score_bias(7) == attn.score_bias(3000) == -math.log(4096)
    assert al.build("sigmoid", dim=16, heads=2, max_len=None).score_bias(50) == -math.log(50)
    with pytest.raises(ValueError, match="fixed max_len"):
        al.build("sigmoid", dim=16, heads=2, causal=True, max_len=None)


def test_sigmoid_score_bias_sets_b_and_learned_b_starts_there():
    torch.manual_seed(0)
    fixed = al.build("sigmoid", dim=16, heads=4, kv_heads=2, causal=True, max_len=64)
    assert fixed.score_bias(5) == -math.log(64)
    assert al.build("sigmoid", dim=16, heads=2, max_len=None, score_bias=0.0).score_bias(9) == 0
    learned = al.build("sigmoid", dim=16, heads=4, kv_heads=2, causal=True, max_len=64,
                       learn_bias=True)
    torch.testing.assert_close(learned.head_bias.detach(), torch.full((4,), -math.log(64)))
    learned.load_state_dict({**fixed.state_dict(), "head_bias": learned.head_bias.detach()})
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    fixed, learned = fixed.double(), learned.double()
    learned.reset_bias()  # b = -ln 64 in float64 (it was rounded to float32 at construction)
    # the extra channel [q, b / c] . [k, 1] c = c q.k + b: the same output at the start
    torch.testing.assert_close(learned(x), fixed(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(learned.weights(x), fixed.weights(x), atol=1e-12, rtol=1e-12)


def test_sigmoid_learned_bias_is_per_head_trained_and_decodes():
    torch.manual_seed(0)
    attn = al.build("sigmoid", dim=16, heads=2, causal=True, max_len=32,
                    learn_bias=True).double()
    with torch.no_grad():
        attn.head_bias.copy_(torch.tensor([-0.5, -4.0]))
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    w = attn.weights(x)  # head h's weights are sigmoid(c q.k + b_h) on the causal triangle
    seen = {}
    attn.hook_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.hook_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    y = attn(x)
    scores = seen["q"] @ seen["k"].mT / math.sqrt(seen["q"].shape[-1])
    expected = torch.sigmoid(scores + attn.head_bias.view(1, 2, 1, 1)).tril()
    torch.testing.assert_close(w, expected, atol=1e-12, rtol=1e-12)
    y.square().sum().backward()
    assert attn.head_bias.grad is not None and (attn.head_bias.grad != 0).all()
    for backend in ("reference", "tiled"):  # every backend takes the per-head b
        other = al.build("sigmoid", dim=16, heads=2, causal=True, max_len=32, learn_bias=True,
                         backend=backend).double()
        other.load_state_dict(attn.state_dict())
        torch.testing.assert_close(other(x), y, atol=1e-12, rtol=1e-12)
    state = attn.new_state(batch_size=2)
    steps = [attn(x[:, :4], state=state)] + [attn(x[:, t:t + 1], state=state)
                                             for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), y, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"score_bias": float("nan")}, "score_bias must be a finite number"),
    ({"score_bias": "0"}, "score_bias must be a finite number"),
    ({"learn_bias": 1}, "learn_bias must be True or False"),
    ({"max_len": 0}, "max_len must be an int >= 1"),
    ({"max_len": None, "learn_bias": True}, "fixed max_len"),
])
def test_sigmoid_bias_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        al.build("sigmoid", dim=16, heads=2, **kwargs)


# ---------------------------------------------------------------------------- softplus
def _rand_qk(lq=40, lk=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, lq, d, generator=g, dtype=torch.float64),
            torch.randn(2, 3, lk, d, generator=g, dtype=torch.float64))


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def _entropy(w):
    return -(w * torch.log(w.clamp_min(1e-300))).sum(-1)


@pytest.mark.parametrize("p", [None, 3.0, 15.0])
def test_softplus_weights_are_nonnegative_rows_summing_to_one(p):
    q, k = _rand_qk()
    w = softplus_weights(q, k, causal=True, reweight_p=p)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 40, dtype=torch.float64))
    assert (w.triu(1) == 0).all()


def test_lssar_entropy_is_at_most_lssa_entropy():
    q, k = _rand_qk(seed=3)
    vis = _causal(40)
    lssa = _entropy(softplus_weights(q, k, mask=vis, reweight_p=None))
    for p in (3.0, 15.0):
        lssar = _entropy(softplus_weights(q, k, mask=vis, reweight_p=p))
        assert (lssar <= lssa + 1e-9).all()
    assert (_entropy(softplus_weights(q, k, mask=vis, reweight_p=15.0))[..., 10:]
            < lssa[..., 10:] - 0.1).all()


def test_lssar_large_p_gives_near_one_hot_rows():
    q, k = _rand_qk(seed=4)
    w = softplus_weights(q, k, reweight_p=400.0)
    assert (w.amax(-1) > 0.95).mean(dtype=torch.float64) > 0.9


def test_lssa_uses_the_length_scale_ln_d_ln_n():
    q, k = _rand_qk(lq=1, lk=30, d=16, seed=5)
    w = softplus_weights(q, k)
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).mT
    a = torch.nn.functional.softplus(math.log(16) * math.log(30) * cos)
    torch.testing.assert_close(w, a / a.sum(-1, keepdim=True))


def test_lssar_first_rows_keep_weight_and_uniform_rows_stay_uniform():
    q, k = _rand_qk(seed=6)
    w = softplus_weights(q, k, causal=True, reweight_p=15.0)
    assert torch.allclose(w[..., 0, 0], torch.ones(()).double())  # one key: all weight
    assert (w[..., 1, :2] > 0).all()  # rows with <= 3 keys skip the "- 1"
    flat = softplus_weights(torch.zeros(1, 1, 5, 16).double(), k[:1, :1, :9], reweight_p=15.0)
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / 9))


# ------------------------------------------------------------------------------- gated
@pytest.mark.parametrize("kind", ["elementwise", "headwise"])
def test_gate_at_one_recovers_the_ungated_module_exactly(kind):
    torch.manual_seed(0)
    plain = al.build("softmax", dim=32, heads=4, causal=True)
    # the gate bias (gate_bias=True, off by default as in the official) pins the gate
    gated = al.build("gated", dim=32, heads=4, causal=True, gate=kind, gate_bias=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        gated.gate.proj.weight.zero_()
        gated.gate.proj.bias.fill_(40.0)  # sigmoid(40) == 1.0 in float32
    x = torch.randn(2, 11, 32)
    assert torch.equal(gated(x), plain(x))
    with torch.no_grad():
        gated.gate.proj.bias.fill_(-200.0)  # gate 0: nothing passes
    assert gated(x).abs().max() == 0


def test_gate_shapes_and_gated_requires_a_gate():
    assert al.build("gated", dim=32, heads=4).gate.proj.out_features == 32
    assert al.build("gated", dim=32, heads=4, gate="headwise").gate.proj.out_features == 4
    with pytest.raises(ValueError, match="use 'softmax'"):
        al.build("gated", dim=32, heads=4, gate=None)


# --------------------------------------------------------------------------- selective
def test_position_temperature_keeps_the_max_weight_from_decaying_with_n():
    def mean_max_weight(n, temperature):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(64, 1, 1, 32, generator=g)
        k = torch.randn(64, 1, n, 32, generator=g)
        if temperature:
            tau = 1 + math.log(n)  # tau_pos at the last position, exp(-exp(beta)) -> 1
            q = q * tau
        return softmax_weights(q, k, scale=32 ** -0.5).amax(-1).mean().item()
    plain = mean_max_weight(64, False) / mean_max_weight(4096, False)
    selective = mean_max_weight(64, True) / mean_max_weight(4096, True)
    assert plain > 10  # plain softmax dilutes with n
    assert 0.5 < selective < 2.0  # the temperature keeps it roughly constant


def test_temperature_formula():
    temp = Temperature(dim=8, heads=2, token=True, per_head=True)
    with torch.no_grad():
        temp.beta.copy_(torch.tensor([0.0, -2.0]))
        temp.token.weight.normal_()
    x = torch.randn(1, 5, 8)
    tau = temp(x, torch.arange(5))[0, :, :, 0]
    slope = torch.exp(-torch.exp(temp.beta))
    expected = (1 + slope[:, None] * torch.log(torch.arange(1, 6.0))
                + torch.tanh(temp.token(x))[0].T)
    torch.testing.assert_close(tau, expected)


def test_temperature_starts_at_the_official_slope_with_one_beta_per_layer():
    attn = al.build("selective", dim=16, heads=4)
    assert attn.query_temperature.beta.shape == (1,)
    torch.testing.assert_close(attn.query_temperature.slope(),
                               torch.tensor([math.exp(-math.exp(1.5))]))
    old = al.build("selective", dim=16, heads=4, beta_init=math.log(math.log(2)),
                   beta_per_head=True)
    assert old.query_temperature.beta.shape == (4,)
    torch.testing.assert_close(old.query_temperature.slope(), torch.full((4,), 0.5))


def test_selective_adds_under_half_a_percent_of_parameters():
    base = sum(p.numel() for p in al.build("softmax", dim=512, heads=8).parameters())
    sel = sum(p.numel() for p in al.build("selective", dim=512, heads=8).parameters())
    assert 0 < (sel - base) / base < 0.005


def test_selective_hook_q_holds_the_temperature_scaled_queries():
    attn = al.build("selective", dim=16, heads=2, causal=True)
    with torch.no_grad():
        attn.query_temperature.beta.fill_(-3.0)
    seen = {}
    attn.hook_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    x = torch.randn(1, 6, 16)
    attn(x)
    raw = attn.split_heads(attn.qkv.q(x), 2)
    tau = attn.query_temperature(x, torch.arange(6))
    torch.testing.assert_close(seen["q"], raw * tau)
