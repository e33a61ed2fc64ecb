"""neighborhood against NATTEN's modules (SHI-Labs/NATTEN @ 8c8729f, src/natten/modules.py
``NeighborhoodAttention1D`` / ``NeighborhoodAttention2D``: a fused ``qkv`` Linear with bias, q
scaled by head_dim^-1/2, neighborhood attention, ``proj`` with bias; no relative position bias
in this version of the module).

Re-expressed here in float64, position by position, from the window rule of "Generalized
Neighborhood Attention" as NATTEN implements it (per axis of length L, kernel K, dilation d,
stride S; a query at i in dilation group i mod d, position i' = i // d in a group of length
L_g): non-causal, its leader min((i' // S) S + S // 2, L_g - 1) and the K keys starting at
min(max(leader - K // 2, 0), L_g - K); causal, keys max(leader - K + 1, 0) .. i' with leader
min((i' // S) S + S - 1, L_g - 1). The fused weight is built from three leaves, so each part's
gradient is that leaf's.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab as al

from ..ops.test_neighborhood import explicit_axis_window
from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="neighborhood",
    code="SHI-Labs/NATTEN @ 8c8729f, src/natten/modules.py, NeighborhoodAttention1D/2D",
    differences=(
        "no projection biases by default (bias=True gives NATTEN's qkv_bias=True and proj bias)",
    ),
)

DIM, HEADS = 16, 2
NAMES = {"qkv.q.weight": "q.weight", "qkv.k.weight": "k.weight", "qkv.v.weight": "v.weight",
         "qkv.q.bias": "q.bias", "qkv.k.bias": "k.bias", "qkv.v.bias": "v.bias",
         "o_proj.weight": "proj.weight", "o_proj.bias": "proj.bias"}


def axis_keys(i: int, length: int, k: int, d: int, s: int, causal: bool) -> list[int]:
    """The key positions query ``i`` sees along one axis: the rule written out position by
    position in the op tests (independent of attnlab's window tables)."""
    return sorted(explicit_axis_window(length, k, d, s, causal)[i])


def official_forward(p, x, kernel, dilation, stride, causal):
    """NATTEN's NeighborhoodAttention{1,2}D on x (B, *spatial, C)."""
    b, *spatial, c = x.shape
    hd = c // HEADS
    w = torch.cat([p["q.weight"], p["k.weight"], p["v.weight"]])
    bias = torch.cat([p["q.bias"], p["k.bias"], p["v.bias"]])
    qkv = (x @ w.T + bias).reshape(b, *spatial, 3, HEADS, hd)
    q, k, v = qkv.unbind(-3)
    q = q * hd ** -0.5
    out = torch.zeros_like(q)
    for pos in itertools.product(*(range(n) for n in spatial)):
        per_axis = [axis_keys(i, n, kernel[a], dilation[a], stride[a], causal[a])
                    for a, (i, n) in enumerate(zip(pos, spatial, strict=True))]
        keys = list(itertools.product(*per_axis))
        kk = torch.stack([k[(slice(None), *key)] for key in keys], 1)  # (B, K, H, hd)
        vv = torch.stack([v[(slice(None), *key)] for key in keys], 1)
        s = torch.einsum("bhd,bkhd->bhk", q[(slice(None), *pos)], kk)
        out[(slice(None), *pos)] = torch.einsum("bhk,bkhd->bhd", s.softmax(-1), vv)
    y = out.reshape(b, *spatial, c)
    return y @ p["proj.weight"].T + p["proj.bias"]


CASES = {  # spatial, kernel, dilation, stride, causal per axis
    "1d": ((13,), (5,), (1,), (1,), (False,)),
    "1d-dilated-strided": ((14,), (3,), (2,), (2,), (False,)),
    "1d-causal": ((11,), (4,), (1,), (1,), (True,)),
    "2d": ((6, 7), (3, 5), (1, 1), (1, 1), (False, False)),
    "2d-dilated-causal-rows": ((7, 6), (3, 3), (2, 1), (1, 2), (True, False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_neighborhood_equals_the_natten_module(name):
    spatial, kernel, dilation, stride, causal = CASES[name]
    gen = torch.Generator().manual_seed(len(name))

    def w(*shape):
        return leaf(torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5)

    p = {"q.weight": w(DIM, DIM), "k.weight": w(DIM, DIM), "v.weight": w(DIM, DIM),
         "q.bias": w(DIM), "k.bias": w(DIM), "v.bias": w(DIM), "proj.weight": w(DIM, DIM),
         "proj.bias": w(DIM)}
    x = torch.randn(2, *spatial, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, *spatial, DIM, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, kernel, dilation, stride, causal)
    (y_off * weight).sum().backward()

    axes = {"causal_axes": causal} if len(spatial) > 1 else {"causal": causal[0]}
    attn = al.build("neighborhood", dim=DIM, heads=HEADS, bias=True,
                    kernel_size=kernel if len(kernel) > 1 else kernel[0],
                    dilation=dilation if len(dilation) > 1 else dilation[0],
                    stride=stride if len(stride) > 1 else stride[0], **axes).double()
    own = dict(attn.named_parameters())
    with torch.no_grad():
        for mine, theirs in NAMES.items():
            own[mine].copy_(p[theirs])
    xa = leaf(x)
    y = attn(xa)
    (y * weight).sum().backward()
    assert_parity({"out": (y, y_off), "grad x": (xa.grad, xo.grad),
                   **{f"grad {m}": (own[m].grad, p[t].grad) for m, t in NAMES.items()}})
