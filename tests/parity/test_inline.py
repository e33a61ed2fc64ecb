"""inline against the official InLine attention (LeapLabTHU/InLine @ e463a6f,
models/inline_swin.py ``InLineAttention``; the DeiT and PVT files hold the same module).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: a fused ``qkv`` linear (with bias: every released model sets
``qkv_bias=True``), ``proj`` (always biased) and the local module ``residual``: a 1x1 grouped
conv C -> C (one group per head), GELU, a 1x1 grouped conv C -> 9C, applied to the mean token;
its output is one 3x3 kernel per channel, convolved (zero padding 1) with that channel of V
on the square window. The attention itself is the InLine form
y = phi(q) (c/n) phi(K)^T V + (1 - c phi(q).mean phi(K)) mean V, c = d^-1/2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="inline",
    code="LeapLabTHU/InLine @ e463a6f, models/inline_swin.py, InLineAttention",
    differences=(
        "projections keep PyTorch's linear init; the official models re-initialise every "
        "linear trunc-normal(0.02), bias 0 (a model-level choice; the local MLP's conv init, "
        "untouched there, is equal)",
        "qkv_bias=False with a biased proj (no released model) is not expressible: bias= "
        "switches all four projections",
        "any H x W grid and sequences (middle kernel row), key padding, causal prefix form: "
        "attnlab extensions (official: square windows only)",
    ),
)

B, DIM = 2, 24
OFFICIAL_MAPS = {"identity": lambda t: t, "relu": F.relu, "leakyrelu": F.leaky_relu,
                 "exp": lambda t: torch.exp(0.2 * t)}
ATTNLAB_MAPS = {"identity": "identity", "relu": "relu", "leakyrelu": "leaky_relu",
                "exp": "exp"}


def official_params(heads: int, gen: torch.Generator, dim: int = DIM) -> dict:
    """A random state dict of the official module (float64 leaves), official names/shapes."""
    def w(*shape, fan):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * fan ** -0.5
    group = dim // heads
    p = {"qkv.weight": w(3 * dim, dim, fan=dim), "qkv.bias": w(3 * dim, fan=dim),
         "proj.weight": w(dim, dim, fan=dim), "proj.bias": w(dim, fan=dim),
         "residual.0.weight": w(dim, group, 1, fan=group), "residual.0.bias": w(dim, fan=group),
         "residual.2.weight": w(9 * dim, group, 1, fan=group),
         "residual.2.bias": w(9 * dim, fan=group)}
    return {k: leaf(v) for k, v in p.items()}


def grouped_pointwise(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      groups: int) -> torch.Tensor:
    """A 1x1 Conv1d with ``groups`` on one position: t (B, Cin) -> (B, Cout), as a
    block-diagonal matrix product."""
    out_ch, in_per_group, _ = weight.shape
    blocks = weight.reshape(groups, out_ch // groups, in_per_group)
    y = torch.einsum("goi,bgi->bgo", blocks, t.reshape(t.shape[0], groups, in_per_group))
    return y.reshape(t.shape[0], out_ch) + bias


def official_forward(p: dict, x: torch.Tensor, heads: int,
                     kernel_func: str = "identity") -> torch.Tensor:
    """The official InLineAttention on x (B, n, C), n a square (one window)."""
    b, n, c = x.shape
    side, d = math.isqrt(n), c // heads
    assert side * side == n
    q, k, v = (x @ p["qkv.weight"].T + p["qkv.bias"]).split(c, dim=-1)
    phi = OFFICIAL_MAPS[kernel_func]
    q, k = phi(q), phi(k)
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))
    scale = d ** -0.5
    kv = k.transpose(-1, -2) @ v * (scale / n)
    k_mean, v_mean = k.mean(2, keepdim=True), v.mean(2, keepdim=True)
    y = q @ kv + (1 - scale * q @ k_mean.transpose(-1, -2)) * v_mean
    y = y.transpose(1, 2).reshape(b, n, c)

    hidden = F.gelu(grouped_pointwise(x.mean(1), p["residual.0.weight"],
                                      p["residual.0.bias"], heads))
    kernels = grouped_pointwise(hidden, p["residual.2.weight"], p["residual.2.bias"], heads)
    image = v.transpose(1, 2).reshape(b, side, side, c).permute(0, 3, 1, 2)
    local = F.conv2d(image.reshape(1, b * c, side, side), kernels.reshape(b * c, 1, 3, 3),
                     padding=1, groups=b * c)
    y = y + local.reshape(b, c, n).transpose(1, 2)
    return y @ p["proj.weight"].T + p["proj.bias"]


# attnlab parameter -> (official parameter, chunk of the fused qkv or None)
WEIGHT_MAP = {
    "qkv.q.weight": ("qkv.weight", 0), "qkv.k.weight": ("qkv.weight", 1),
    "qkv.v.weight": ("qkv.weight", 2), "qkv.q.bias": ("qkv.bias", 0),
    "qkv.k.bias": ("qkv.bias", 1), "qkv.v.bias": ("qkv.bias", 2),
    "o_proj.weight": ("proj.weight", None), "o_proj.bias": ("proj.bias", None),
    "local.hidden.weight": ("residual.0.weight", None),
    "local.hidden.bias": ("residual.0.bias", None),
    "local.kernel.weight": ("residual.2.weight", None),
    "local.kernel.bias": ("residual.2.bias", None),
}


def official_part(t: torch.Tensor, part: int | None) -> torch.Tensor:
    return t if part is None else t.chunk(3, 0)[part]


def load_official(attn: torch.nn.Module, p: dict) -> None:
    """Copy the official weights into ``attn`` (every parameter of both mapped)."""
    own = dict(attn.named_parameters())
    assert set(own) == set(WEIGHT_MAP), "every attnlab parameter mapped"
    assert {theirs for theirs, _ in WEIGHT_MAP.values()} == set(p), "every official one"
    with torch.no_grad():
        for mine, (theirs, part) in WEIGHT_MAP.items():
            own[mine].copy_(official_part(p[theirs], part))


@pytest.mark.parametrize("heads", [1, 3, 4])
@pytest.mark.parametrize("kernel_func", ["identity", "relu", "leakyrelu", "exp"])
@pytest.mark.parametrize("side", [4, 5])
def test_inline_equals_the_official_module(heads, kernel_func, side):
    gen = torch.Generator().manual_seed(100 * heads + side)
    p = official_params(heads, gen)
    x = torch.randn(B, side * side, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, side * side, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo, heads, kernel_func)
    (y_off * weight).sum().backward()

    attn = al.build("inline", dim=DIM, heads=heads,
                    feature_map=ATTNLAB_MAPS[kernel_func]).double()
    load_official(attn, p)
    xa = leaf(x.reshape(B, side, side, DIM))  # an image: (B, H, W, C)
    y = attn(xa).reshape(B, side * side, DIM)
    (y * weight).sum().backward()

    pairs = {"out": (y, y_off), "grad x": (xa.grad.reshape(B, -1, DIM), xo.grad)}
    for mine, t in attn.named_parameters():
        theirs, part = WEIGHT_MAP[mine]
        pairs[f"grad {mine}"] = (t.grad, official_part(p[theirs].grad, part))
    assert_parity(pairs)


def test_defaults_are_the_official_module():
    """Official configuration: identity map, qkv and proj biases, the local MLP with one
    group per head and PyTorch's Conv1d init U(+-1/sqrt(C/H)) (the official models'
    re-initialisation touches only linear layers and norms)."""
    dim, heads = 256, 4
    torch.manual_seed(0)
    attn = al.build("inline", dim=dim, heads=heads)
    assert attn.feature_map == "identity" and not attn.causal
    shapes = {n: tuple(t.shape) for n, t in attn.named_parameters()}
    official = {"qkv.weight": (3 * dim, dim), "qkv.bias": (3 * dim,),
                "proj.weight": (dim, dim), "proj.bias": (dim,),
                "residual.0.weight": (dim, dim // heads, 1), "residual.0.bias": (dim,),
                "residual.2.weight": (9 * dim, dim // heads, 1), "residual.2.bias": (9 * dim,)}
    for mine, (theirs, part) in WEIGHT_MAP.items():
        want = official[theirs] if part is None else (official[theirs][0] // 3,
                                                      *official[theirs][1:])
        assert shapes[mine] == want, mine
    assert attn.local.hidden.groups == heads and attn.local.kernel.groups == heads
    bound = (dim // heads) ** -0.5
    for t in (attn.local.hidden.weight, attn.local.hidden.bias, attn.local.kernel.weight,
              attn.local.kernel.bias):
        assert t.abs().max() <= bound  # uniform on [-bound, bound]: std bound / sqrt(3)
        assert abs(t.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert attn.local.kernel.weight.abs().max() > 0.9 * bound  # not zero-initialised
