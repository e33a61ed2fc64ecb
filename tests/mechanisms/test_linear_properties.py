"""The catalogue's property checks for the linear family (docs/mechanisms/, the linear family)."""

import pytest
import torch

import attnlab as al
from attnlab.mechanisms.hedgehog import HedgehogFeatureMap
from attnlab.ops.linear import elu_plus_one
from attnlab.ops.softmax import softmax_weights

RECURRENT = ["linear", "mala", "inline", "hedgehog"]


@pytest.mark.parametrize("name", RECURRENT)
def test_decode_state_size_does_not_grow_with_position(name):
    attn = al.build(name, dim=32, heads=4, causal=True).eval()
    state = attn.new_state(batch_size=2)
    attn(torch.randn(2, 5, 32), state=state)
    after_prefill = state.nbytes()
    for _ in range(40):
        attn(torch.randn(2, 1, 32), state=state)
    assert state.position == 45
    assert state.nbytes() == after_prefill > 0


def _weights(name, q, k, **kw):
    """weights() of a mechanism for given q, k (bypassing the projections)."""
    attn = al.build(name, dim=q.shape[-1] * q.shape[1], heads=q.shape[1], **kw)
    call = al.Call(torch.zeros(q.shape[0], q.shape[2], attn.dim), torch.arange(q.shape[2]),
                   None, None, None, None)
    return attn.attention_weights(q, k, call)


def _qk(seed=0, n=32, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64),
            torch.randn(1, 1, n, d, generator=g, dtype=torch.float64))


def test_mala_sharpens_with_query_scale_while_relu_linear_attention_does_not():
    q, k = _qk()
    relu = [_weights("linear", s * q, k, feature_map="relu") for s in (1, 2, 4, 8)]
    for w in relu[1:]:
        torch.testing.assert_close(w, relu[0])  # relu is homogeneous: scale cancels
    mala = [_weights("mala", s * q, k).amax(-1).mean().item() for s in (1, 2, 4, 8)]
    assert all(b > a for a, b in zip(mala, mala[1:], strict=False)), mala
    assert mala[-1] > 2 * mala[0]


@pytest.mark.parametrize("name", ["mala", "inline"])
@pytest.mark.parametrize("causal", [False, True])
def test_mala_and_inline_rows_sum_to_one_with_negative_entries(name, causal):
    q, k = _qk(seed=1)
    # mala: eps=0 (its official 1/(z + 1e-6) makes rows sum to z / (z + 1e-6))
    w = _weights(name, q, k, causal=causal,
                 **({"local": False} if name == "inline" else {"eps": 0.0}))
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 32, dtype=torch.float64))
    assert (w < 0).any()
    if causal:
        assert (w.triu(1) == 0).all()


def test_inline_is_injective_where_relu_linear_attention_is_not():
    q, k = _qk(seed=2)
    relu_q, relu_2q = (_weights("linear", s * q, k, feature_map="relu") for s in (1, 2))
    torch.testing.assert_close(relu_q, relu_2q)
    inline_q, inline_2q = (_weights("inline", s * q, k, local=False) for s in (1, 2))
    assert (inline_q - inline_2q).abs().max() > 1e-2


def test_hedgehog_distillation_mimics_softmax_far_better_than_elu():
    """A few hundred CPU steps on one head: cross-entropy to softmax well below elu+1's."""
    torch.manual_seed(0)
    n, d = 64, 16
    q = torch.randn(8, 1, n, d) * 1.5
    k = torch.randn(8, 1, n, d) * 1.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    teacher = softmax_weights(q, k, causal=True, scale=d ** -0.5)
    entropy = -(teacher * teacher.clamp_min(1e-12).log()).sum(-1).mean()

    def excess_ce(a):
        w = a.masked_fill(~causal, 0)
        w = w / w.sum(-1, keepdim=True)
        return -(teacher * w.clamp_min(1e-12).log()).sum(-1).mean() - entropy

    elu = excess_ce(elu_plus_one(q) @ elu_plus_one(k).mT).item()
    phi = HedgehogFeatureMap(1, d, "exp")
    start = excess_ce(phi(q) @ phi(k).mT).item()
    opt = torch.optim.Adam(phi.parameters(), lr=0.05)
    for _ in range(300):
        loss = excess_ce(phi(q) @ phi(k).mT)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = excess_ce(phi(q) @ phi(k).mT).item()
    # excess cross-entropy over the teacher's entropy (nats): elu+1 1.19, start 0.88,
    # trained 0.52 when this was written
    assert trained < 0.5 * elu and trained < 0.7 * start, (elu, start, trained)
    # Monotonicity in q.k: Hedgehog's weights rank the keys more like q.k than elu+1's do
    # (mean rank correlation over rows 0.66 vs 0.52 when written; the paper's "monotone" is
    # only partly reproduced: the identity-initialised map started at 0.70).
    assert rank_agreement(phi(q) @ phi(k).mT, q @ k.mT) > \
        rank_agreement(elu_plus_one(q) @ elu_plus_one(k).mT, q @ k.mT) + 0.05


def rank_agreement(weights, scores, first_row=16):
    """Mean over rows of the rank correlation between weights and scores of visible keys."""
    ranks = lambda t: t.argsort().argsort().double()  # noqa: E731
    values = []
    for b in range(weights.shape[0]):
        for i in range(first_row, weights.shape[2]):
            pair = torch.stack([ranks(weights[b, 0, i, : i + 1].detach()),
                                ranks(scores[b, 0, i, : i + 1])])
            values.append(torch.corrcoef(pair)[0, 1])
    return torch.stack(values).mean().item()


def test_hedgehog_extra_loss_is_the_distillation_loss_in_training_only():
    attn = al.build("hedgehog", dim=32, heads=2, causal=True, distill=True)
    x = torch.randn(2, 10, 32)
    attn.train()
    attn(x)
    loss = attn.extra_loss()
    assert loss.item() > 0
    loss.backward()
    assert attn.phi.weight.grad is not None and attn.qkv.q.weight.grad is None
    attn.eval()
    attn(x)  # an eval forward leaves no stale training loss behind
    assert attn.extra_loss().item() == 0.0
