"""rfa has no official code: "What can a Single Attention Layer Learn? A Study Through the
Random Features Lens" is a theory paper. The module is checked instead against the paper's
layer, re-expressed here in float64 from its equation (not from attnlab's code), one head,
query and key at a time:

    f(x_t; X) = sum_m (1 / N_t) sum_{i visible to t} sigma(x_t^T W_m x_i) V_m x_i

with M = ``heads`` frozen random matrices W_m (C x C, N(0, 1/C) entries plus
``identity_mean`` I / sqrt(C)) and the values V_m x_i read out by the output projection
(attnlab's value projection gives each head a vector, the output projection sums the heads).
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="rfa",
    code="none: a theory paper, no code released",
    checked_against="the paper's random-feature attention layer, re-expressed independently "
                    "in float64 (output, input and parameter gradients)",
)

B, N, DIM, HEADS, HD = 2, 7, 12, 3, 4
SIGMA = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def formula(w: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, x: torch.Tensor,
            activation: str, causal: bool, keep: torch.Tensor) -> torch.Tensor:
    """The paper's layer with per-head value vectors V_m = wv[m] and the read-out wo."""
    sigma = SIGMA[activation]
    out = torch.zeros(B, N, DIM, dtype=x.dtype)
    for b in range(B):
        for t in range(N):
            seen = [i for i in range(N) if keep[b, i] and (not causal or i <= t)]
            if not seen:
                continue
            heads = []
            for m in range(HEADS):
                vm = wv[m * HD:(m + 1) * HD]
                acc = sum(sigma(x[b, t] @ w[m] @ x[b, i]) * (vm @ x[b, i]) for i in seen)
                heads.append(acc / len(seen))
            out[b, t] = torch.cat(heads) @ wo.T
    return out


@pytest.mark.parametrize("activation,causal,padded,identity_mean", [
    ("relu", False, False, 0.0),     # the default
    ("relu", True, True, 1.0),
    ("sigmoid", False, True, 1.0),
    ("tanh", True, False, 0.5),
])
def test_rfa_equals_the_papers_layer(activation, causal, padded, identity_mean):
    torch.manual_seed(3)
    attn = al.build("rfa", dim=DIM, heads=HEADS, head_dim=HD, activation=activation,
                    causal=causal, identity_mean=identity_mean).double()
    gen = torch.Generator().manual_seed(4)
    wv = leaf(torch.randn(HEADS * HD, DIM, generator=gen, dtype=torch.float64) / DIM ** 0.5)
    wo = leaf(torch.randn(DIM, HEADS * HD, generator=gen, dtype=torch.float64) / DIM ** 0.5)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, N, dtype=torch.bool)
    if padded:
        keep[0, :2] = False
        keep[1, 4] = False
    w = attn.qkv.random_qk.detach().clone()  # the frozen W_m, shared by both sides

    xo = leaf(x)
    y_ref = formula(w, wv, wo, xo, activation, causal, keep)
    (y_ref * weight * keep[..., None]).sum().backward()

    with torch.no_grad():
        attn.qkv.v.weight.copy_(wv)
        attn.o_proj.weight.copy_(wo)
    xa = leaf(x)
    y = attn(xa, mask=keep if padded else None)
    (y * weight * keep[..., None]).sum().backward()
    real = keep[..., None]
    assert_parity({"out": (y * real, y_ref * real), "grad x": (xa.grad, xo.grad),
                   "grad qkv.v.weight": (attn.qkv.v.weight.grad, wv.grad),
                   "grad o_proj.weight": (attn.o_proj.weight.grad, wo.grad)})
    assert not attn.qkv.random_qk.requires_grad  # W_m frozen: a buffer


def test_random_matrices_have_the_papers_distribution():
    """W_m entries N(0, 1/C) plus identity_mean I / sqrt(C)."""
    c, m = 64, 32
    torch.manual_seed(0)
    w = al.build("rfa", dim=c, heads=m, identity_mean=2.0).qkv.random_qk.double()
    eye = torch.eye(c, dtype=torch.float64)
    noise = (w - 2.0 * eye / c ** 0.5) * c ** 0.5  # N(0, 1) if the init is right
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.std().item() - 1.0) < 0.01


def test_layers_draw_independent_random_matrices():
    """Two layers of a model differ (the default seed=None draws from torch's generator);
    torch.manual_seed makes a model reproducible; an explicit seed fixes a layer's W_m."""
    def draw(**kw):
        return al.build("rfa", dim=8, heads=2, **kw).qkv.random_qk
    torch.manual_seed(0)
    first, second = draw(), draw()
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(draw(), first)
    torch.manual_seed(1)
    a = draw(seed=5)
    torch.manual_seed(2)
    assert torch.equal(draw(seed=5), a)
    assert not torch.equal(draw(seed=6), a)
