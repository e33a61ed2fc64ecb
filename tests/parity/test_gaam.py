"""gaam against the official Gaussian Adaptive Attention (gioannides/Gaussian-Adaptive-Attention
@ 145d1bc, gaussian_adaptive_attention/GaussianBlock.py ``GaussianAdaptiveAttention``).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: one single-head module per attnlab head, applied to that head's channels of
the value projection with the token axis as its ``norm_axis`` and no padding value; each holds
``mean_offsets`` (G,) and ``c`` (G,). Over the tokens: mean, unbiased variance (``torch.var``,
N - 1) plus eps (1e-8, the value every official head ends up with), then for each Gaussian
exp(-((x - mean - offset_g) / sqrt(var))^2 / (2 c_g^2)) / sqrt(2 pi c_g^2), their product,
divided by its sum over the tokens (clamped at eps), times x. The value and output
projections around it are attnlab's (the official module has none): they are given random
weights here and compared as well.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="gaam",
    code="gioannides/Gaussian-Adaptive-Attention @ 145d1bc, "
         "gaussian_adaptive_attention/GaussianBlock.py, GaussianAdaptiveAttention",
    checked_against="its float64 re-expression, one official module per head on that head's "
                    "value channels (output, input and parameter gradients)",
    differences=(
        "a head is a chunk of channels normalised over all tokens; the official multi-head "
        "wrapper cuts the normalised axis into blocks (contract: any length, padding)",
        "value and output projections around it (contract); the official has none",
        "padding by a key mask, statistics over real tokens (official: a padding value counted "
        "as zeros)",
    ),
)

B, N, DIM = 2, 7, 24
EPS = 1e-8


def official_head(x, mean_offsets, c, axis):
    mean = x.mean(dim=axis, keepdim=True)
    var = x.var(dim=axis, keepdim=True) + EPS
    mixture = 1
    for i in range(mean_offsets.shape[0]):
        y = (x - (mean + mean_offsets[i])) / torch.sqrt(var)
        mixture = mixture * (torch.exp(-(y ** 2) / (2.0 * c[i] ** 2))
                             / torch.sqrt(2 * math.pi * c[i] ** 2))
    mixture = mixture / mixture.sum(dim=axis, keepdim=True).clamp(min=EPS)
    return x * mixture


def official_params(heads, gaussians, gen):
    p = {"v.weight": torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * DIM ** -0.5,
         "o.weight": torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * DIM ** -0.5}
    for h in range(heads):
        p[f"heads.{h}.mean_offsets"] = 0.5 * torch.randn(gaussians, generator=gen,
                                                         dtype=torch.float64)
        p[f"heads.{h}.c"] = torch.exp(torch.randn(gaussians, generator=gen, dtype=torch.float64))
    return {k: leaf(v) for k, v in p.items()}


def official_forward(p, x, heads):
    v = x @ p["v.weight"].T  # attnlab's value projection
    hd = DIM // heads
    out = [official_head(v[..., h * hd:(h + 1) * hd], p[f"heads.{h}.mean_offsets"],
                         p[f"heads.{h}.c"], axis=1) for h in range(heads)]
    return torch.cat(out, -1) @ p["o.weight"].T  # attnlab's output projection


@pytest.mark.parametrize("heads,gaussians", [(1, 3), (4, 4), (3, 1)])
def test_gaam_equals_the_official_module(heads, gaussians):
    gen = torch.Generator().manual_seed(60 + heads)
    p = official_params(heads, gaussians, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo, heads)
    (y_off * weight).sum().backward()

    attn = al.build("gaam", dim=DIM, heads=heads, gaussians=gaussians).double()
    assert {n for n, _ in attn.named_parameters()} == \
        {"qkv.v.weight", "o_proj.weight", "offset", "scale"}
    with torch.no_grad():
        attn.qkv.v.weight.copy_(p["v.weight"])
        attn.o_proj.weight.copy_(p["o.weight"])
        attn.offset.copy_(torch.stack([p[f"heads.{h}.mean_offsets"] for h in range(heads)]))
        attn.scale.copy_(torch.stack([p[f"heads.{h}.c"] for h in range(heads)]))
    xa = leaf(x)
    y = attn(xa)
    (y * weight).sum().backward()

    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad),
             "grad qkv.v.weight": (attn.qkv.v.weight.grad, p["v.weight"].grad),
             "grad o_proj.weight": (attn.o_proj.weight.grad, p["o.weight"].grad),
             "grad offset": (attn.offset.grad,
                             torch.stack([p[f"heads.{h}.mean_offsets"].grad
                                          for h in range(heads)])),
             "grad scale": (attn.scale.grad,
                            torch.stack([p[f"heads.{h}.c"].grad for h in range(heads)]))}
    assert_parity(pairs)


def test_gaam_defaults_are_the_official_ones():
    """eps 1e-8, unbiased variance, c = exp(N(0, 1)): log c of many heads looks standard
    normal; the switches give the earlier module (c = 1, variance over N)."""
    torch.manual_seed(0)
    attn = al.build("gaam", dim=512, heads=128, gaussians=8)
    assert attn.eps == 1e-8 and attn.unbiased
    log_c = attn.scale.detach().log()
    assert abs(log_c.mean().item()) < 0.1 and abs(log_c.std().item() - 1) < 0.1
    old = al.build("gaam", dim=16, heads=4, gaussians=3, random_scale=False, unbiased=False)
    torch.testing.assert_close(old.scale.detach(), torch.ones(4, 3))
