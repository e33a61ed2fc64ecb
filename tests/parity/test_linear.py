"""linear against the official linear attention (idiap/fast-transformers @ 2ad36b9):
fast_transformers/attention/attention_layer.py ``AttentionLayer`` (``query_projection``,
``key_projection``, ``value_projection``, ``out_projection``, all ``nn.Linear`` with bias) around
fast_transformers/attention/linear_attention.py ``LinearAttention`` (bidirectional; padded keys
zeroed by ``key_lengths``) and causal_linear_attention.py ``CausalLinearAttention``, with the
default feature map elu(x) + 1.

Re-expressed here in float64 from reading that code. The official denominator is
phi(q) . sum phi(k) + eps (eps = 1e-6 by default, a constructor argument); attnlab's is
max(phi(q) . sum phi(k), 1e-6), which with elu + 1 features never binds: the modules agree
exactly with the official eps = 0, and within eps / denominator with its default.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, compare_with_official, leaf, linear

OFFICIAL = Official(
    mechanism="linear",
    code="idiap/fast-transformers @ 2ad36b9, fast_transformers/attention/linear_attention.py "
         "and causal_linear_attention.py, LinearAttention / CausalLinearAttention in "
         "AttentionLayer",
    differences=(
        "denominator max(d, 1e-6) where the official adds eps = 1e-6 to d (a relative "
        "1e-6 / d, under 1e-7 here; equal with the official eps = 0)",
        "no projection biases by default (bias=True gives the official AttentionLayer's)",
    ),
)

B, N, DIM, HEADS = 2, 9, 24, 4
NAMES = {"qkv.q.weight": "query_projection.weight", "qkv.q.bias": "query_projection.bias",
         "qkv.k.weight": "key_projection.weight", "qkv.k.bias": "key_projection.bias",
         "qkv.v.weight": "value_projection.weight", "qkv.v.bias": "value_projection.bias",
         "o_proj.weight": "out_projection.weight", "o_proj.bias": "out_projection.bias"}


def official_params(gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = {}
    for name in ("query_projection", "key_projection", "value_projection", "out_projection"):
        p[f"{name}.weight"] = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) / 5
        p[f"{name}.bias"] = torch.randn(DIM, generator=gen, dtype=torch.float64) / 5
    return {k: leaf(v) for k, v in p.items()}


def official_forward(p, x, keep, causal: bool, eps: float):
    """(output, the denominators (B, N, H))."""
    b, n, _ = x.shape
    q = F.elu(linear(p, "query_projection", x).view(b, n, HEADS, -1)) + 1
    k = F.elu(linear(p, "key_projection", x).view(b, n, HEADS, -1)) + 1
    v = linear(p, "value_projection", x).view(b, n, HEADS, -1)
    k = k * keep[:, :, None, None]
    if causal:
        kv = torch.einsum("nshd,nshm->nshdm", k, v).cumsum(1)
        num = torch.einsum("nlhd,nlhdm->nlhm", q, kv)
        den = torch.einsum("nlhd,nlhd->nlh", q, k.cumsum(1))
    else:
        num = torch.einsum("nlhd,nhdm->nlhm", q, torch.einsum("nshd,nshm->nhdm", k, v))
        den = torch.einsum("nlhd,nhd->nlh", q, k.sum(1))
    y = num / (den + eps)[..., None]
    return linear(p, "out_projection", y.reshape(b, n, DIM)), den


def case(causal: bool, padded: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    p = official_params(gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, N, dtype=torch.bool)
    if padded:
        keep[0, 5:] = False
        weight = weight * keep[..., None]  # outputs at padded queries are not compared
    return p, x, weight, keep


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_equals_fast_transformers_with_eps_zero(causal, padded):
    p, x, weight, keep = case(causal, padded, 5 + 2 * causal + padded)
    xo = leaf(x)
    y_off, _ = official_forward(p, xo, keep.double(), causal, eps=0.0)
    (y_off * weight).sum().backward()
    attn = al.build("linear", dim=DIM, heads=HEADS, causal=causal, bias=True).double()
    compare_with_official(attn, p, NAMES, x, weight, y_off, xo,
                          mask=keep if padded else None)


@pytest.mark.parametrize("causal", [False, True])
def test_with_the_official_eps_the_gap_is_eps_over_the_denominator(causal):
    p, x, _, keep = case(causal, False, 11 + causal)
    with torch.no_grad():
        y_off, den = official_forward(p, x, keep.double(), causal, eps=1e-6)
        y_exact, _ = official_forward(p, x, keep.double(), causal, eps=0.0)
        attn = al.build("linear", dim=DIM, heads=HEADS, causal=causal, bias=True).double()
        own = dict(attn.named_parameters())
        for mine, theirs in NAMES.items():
            own[mine].copy_(p[theirs])
        y = attn(x)
    bound = 1e-6 / den.min().item()
    gap = ((y - y_off).abs().max() / y_off.abs().max()).item()
    assert 0 < gap <= 2 * bound, (gap, bound)  # nonzero: the eps is there and is the gap
    assert ((y - y_exact).abs().max() / y_exact.abs().max()).item() <= 1e-12
