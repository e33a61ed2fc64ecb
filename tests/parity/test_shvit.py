"""shvit against the official SHViT single-head attention (ysj9909/SHViT @ 6a729cc,
model/shvit.py ``SHSA``).

The official computation is re-expressed here in float64 from reading that code, channels
first and in its own parameter layout: ``pre_norm`` (GroupNorm with one group over the p
attended channels and every position), ``qkv`` (a ``Conv2d_BN``: 1 x 1 convolution
``qkv.c`` without bias, then BatchNorm ``qkv.bn``; output rows q | k | v of widths qk_dim,
qk_dim, p) and ``proj`` (ReLU, then the ``Conv2d_BN`` ``proj.1``). BatchNorm is compared in
eval mode with random running statistics: attnlab holds each ``Conv2d_BN`` folded, a linear
map W with a per-channel scale s = gamma / sqrt(var + eps) and a bias beta - s * mean. The
fold is written here as a differentiable map, so attnlab's parameter gradients are carried
back to every official parameter (convolution weight, gamma, beta, GroupNorm weight and bias)
and compared there.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="shvit",
    code="ysj9909/SHViT @ 6a729cc, model/shvit.py, SHSA",
    differences=(
        "Conv2d_BN in its inference form (a linear map with per-channel scale and bias): "
        "training-mode BatchNorm's batch statistics are not reproduced (contract: a sample's "
        "output depends on no other sample and no padding)",
        "causal mode (not in the official): the GroupNorm statistics are each token's own "
        "(contract: causality)",
        "a key padding mask is accepted, the GroupNorm statistics then cover the real tokens "
        "only (contract; the official has none)",
    ),
)

GN_EPS = BN_EPS = 1e-5
B = 2


def official_params(dim: int, pdim: int, qk: int, gen: torch.Generator) -> dict:
    """Official parameters (leaves) and BatchNorm running statistics (plain tensors)."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def var(n):
        return torch.rand(n, generator=gen, dtype=torch.float64) + 0.5

    out = 2 * qk + pdim
    p = {"pre_norm.weight": 1 + 0.3 * rnd(pdim), "pre_norm.bias": 0.3 * rnd(pdim),
         "qkv.c.weight": rnd(out, pdim, 1, 1, scale=pdim ** -0.5),
         "qkv.bn.weight": 1 + 0.3 * rnd(out), "qkv.bn.bias": 0.3 * rnd(out),
         "proj.1.c.weight": rnd(dim, dim, 1, 1, scale=dim ** -0.5),
         "proj.1.bn.weight": 1 + 0.3 * rnd(dim), "proj.1.bn.bias": 0.3 * rnd(dim)}
    p = {k: leaf(v) for k, v in p.items()}
    stats = {"qkv.bn.running_mean": 0.3 * rnd(out), "qkv.bn.running_var": var(out),
             "proj.1.bn.running_mean": 0.3 * rnd(dim), "proj.1.bn.running_var": var(dim)}
    return {**p, **stats}


def conv_bn(p: dict, name: str, x):
    """A 1 x 1 Conv2d_BN on (B, C, H, W), BatchNorm in eval mode."""
    z = torch.einsum("oi,bihw->bohw", p[f"{name}.c.weight"][:, :, 0, 0], x)
    mean, var = p[f"{name}.bn.running_mean"], p[f"{name}.bn.running_var"]
    z = (z - mean[:, None, None]) / torch.sqrt(var[:, None, None] + BN_EPS)
    return z * p[f"{name}.bn.weight"][:, None, None] + p[f"{name}.bn.bias"][:, None, None]


def official_forward(p: dict, x, pdim: int, qk: int):
    """SHSA on x (B, C, H, W)."""
    b, c, h, w = x.shape
    x1, x2 = x[:, :pdim], x[:, pdim:]
    mean = x1.mean((1, 2, 3), keepdim=True)
    var = (x1 - mean).pow(2).mean((1, 2, 3), keepdim=True)
    x1 = (x1 - mean) / torch.sqrt(var + GN_EPS)
    x1 = x1 * p["pre_norm.weight"][:, None, None] + p["pre_norm.bias"][:, None, None]
    qkv = conv_bn(p, "qkv", x1).flatten(2)  # (B, 2 qk + p, N)
    q, k, v = qkv[:, :qk], qkv[:, qk:2 * qk], qkv[:, 2 * qk:]
    attn = torch.softmax((q.transpose(1, 2) @ k) / math.sqrt(qk), -1)  # (B, N, N)
    x1 = (v @ attn.transpose(1, 2)).reshape(b, pdim, h, w)
    return conv_bn(p, "proj.1", torch.relu(torch.cat([x1, x2], 1)))


def folded(p: dict, name: str) -> tuple:
    """The Conv2d_BN ``name`` as (W, s, b): differentiable in the official parameters."""
    s = p[f"{name}.bn.weight"] / torch.sqrt(p[f"{name}.bn.running_var"] + BN_EPS)
    return (p[f"{name}.c.weight"][:, :, 0, 0], s,
            p[f"{name}.bn.bias"] - s * p[f"{name}.bn.running_mean"])


def attnlab_values(p: dict, qk: int) -> dict:
    """attnlab name -> its value as a function of the official parameters."""
    values = {"qkv.norm.weight": p["pre_norm.weight"], "qkv.norm.bias": p["pre_norm.bias"]}
    w, s, b = folded(p, "qkv")
    rows = {"q": slice(0, qk), "k": slice(qk, 2 * qk), "v": slice(2 * qk, None)}
    for part, r in rows.items():
        values.update({f"qkv.{part}.weight": w[r], f"qkv.{part}.scale": s[r],
                       f"qkv.{part}.bias": b[r]})
    w, s, b = folded(p, "proj.1")
    values.update({"proj.weight": w, "proj.scale": s, "proj.bias": b})
    return values


@pytest.mark.parametrize("dim,pdim,qk,grid", [(24, 6, 4, (3, 4)), (32, 8, 16, (4, 4)),
                                              (16, 16, 8, (2, 5)), (40, 10, 3, (5, 3))])
def test_shvit_equals_the_official_module(dim, pdim, qk, grid):
    gen = torch.Generator().manual_seed(dim + qk)
    p = official_params(dim, pdim, qk, gen)
    x = torch.randn(B, dim, *grid, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, dim, *grid, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo, pdim, qk)
    (y_off * weight).sum().backward()

    attn = al.build("shvit", dim=dim, heads=1, partial=pdim / dim, qk_dim=qk).double()
    assert attn.partial_channels == pdim
    mine = {k: leaf(v) if v.requires_grad else v for k, v in p.items()}  # fold from a copy
    values = attnlab_values(mine, qk)
    own = dict(attn.named_parameters())
    assert set(own) == set(values), "every attnlab parameter mapped"
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(values[name])
    xa = leaf(x.permute(0, 2, 3, 1))  # attnlab takes (B, H, W, C)
    y = attn(xa)
    (y * weight.permute(0, 2, 3, 1)).sum().backward()
    # carry attnlab's gradients back through the fold to the official parameters
    torch.autograd.backward([values[n] for n in own], [own[n].grad for n in own])

    pairs = {"out": (y.permute(0, 3, 1, 2), y_off),
             "grad x": (xa.grad.permute(0, 3, 1, 2), xo.grad)}
    for name, t in p.items():
        if t.requires_grad:
            pairs[f"grad {name}"] = (mine[name].grad, t.grad)
    assert_parity(pairs)


def test_shvit_defaults_are_the_official_ones():
    """SHViT-S1's first stage (dim 128, p 32, qk 16), with the official initialisation."""
    torch.manual_seed(0)
    attn = al.build("shvit", dim=128, heads=1)
    assert attn.partial_channels == 32 and attn.shape.qk_dim == 16 and not attn.causal
    proj = attn.qkv
    assert torch.equal(proj.norm.weight, torch.ones(32))
    assert torch.equal(proj.norm.bias, torch.zeros(32))
    for part, rows in (("q", 16), ("k", 16), ("v", 32)):
        lin = getattr(proj, part)
        assert lin.weight.shape == (rows, 32)
        # Conv2d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm weight 1,
        # bias 0, running mean 0 and var 1 folded in
        assert lin.weight.abs().max() <= 32 ** -0.5
        torch.testing.assert_close(lin.scale, torch.full((rows,), (1 + BN_EPS) ** -0.5))
        assert torch.equal(lin.bias, torch.zeros(rows))
    std = torch.cat([attn.qkv.q.weight.flatten(), attn.qkv.v.weight.flatten()]).std()
    assert abs(std.item() / (32 ** -0.5 / math.sqrt(3)) - 1) < 0.1
    # proj: BatchNorm weight 0 (bn_weight_init=0): the module starts at 0
    assert torch.equal(attn.proj.scale, torch.zeros(128))
    assert torch.equal(attn.proj.bias, torch.zeros(128))
    assert attn.proj.weight.abs().max() <= 128 ** -0.5
    assert torch.equal(attn(torch.randn(2, 4, 4, 128)), torch.zeros(2, 4, 4, 128))


def test_shvit_pads_as_a_shorter_sequence_and_normalises_over_real_tokens():
    """With a key padding mask the GroupNorm statistics come from the real tokens only."""
    torch.manual_seed(0)
    attn = al.build("shvit", dim=16, heads=1).double()
    with torch.no_grad():
        attn.proj.scale.fill_(1.0)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    longer = torch.cat([x, 1e3 * torch.randn(1, 3, 16, dtype=torch.float64)], 1)
    keep = torch.arange(10)[None] < 7
    torch.testing.assert_close(attn(longer, mask=keep)[:, :7], attn(x))
