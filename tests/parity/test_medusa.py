"""medusa has no public official code: the MEDUSA authors released TensorFlow checkpoints, not
the code of their attention module. The module is checked instead against the paper's
equation, re-expressed here in float64 from the formula (not from attnlab's code): head h
attends from every token to keys and values averaged over s_h x s_h cells of the token grid
(1 x s_h cells for a sequence), cells at the border averaged over the tokens they hold and
padded tokens left out of every average,

    O_h = softmax(Q_h (P_s K_h)^T / sqrt(D)) P_s V_h,   y = concat_h(O_h) W_o.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="medusa",
    code="none: the authors released TensorFlow checkpoints only, no code of the attention "
         "module",
    checked_against="the paper's single-body multi-scale-head equation, re-expressed "
                    "independently in float64 (output, input and parameter gradients)",
)

B, DIM, HEADS = 2, 24, 4


def cells(grid: tuple[int, int], s: int) -> list[list[int]]:
    """Token indices of each pooling cell, row-major over the cells: s x s cells of an image
    grid (clipped to its sides), 1 x s cells of a one-row sequence."""
    h, w = grid
    ch, cw = (1, s) if h == 1 else (min(s, h), min(s, w))
    out = []
    for r0 in range(0, h, ch):
        for c0 in range(0, w, cw):
            out.append([r * w + c for r in range(r0, min(h, r0 + ch))
                        for c in range(c0, min(w, c0 + cw))])
    return out


def pooled(t: torch.Tensor, groups: list[list[int]], keep: torch.Tensor) -> tuple:
    """(B, cells, D) averages of the real tokens of each cell and (B, cells) which hold one."""
    rows, real = [], []
    for members in groups:
        idx = torch.tensor(members)
        wts = keep[:, idx].to(t.dtype)  # (B, m)
        n = wts.sum(-1)
        rows.append((t[:, idx] * wts[..., None]).sum(1) / n.clamp_min(1)[:, None])
        real.append(n > 0)
    return torch.stack(rows, 1), torch.stack(real, 1)


def formula(p: dict, x: torch.Tensor, scales: tuple[int, ...], grid: tuple[int, int],
            keep: torch.Tensor) -> torch.Tensor:
    """The paper's multi-scale-head attention, one head at a time."""
    d = DIM // HEADS
    q, k, v = (x @ p[n].T for n in ("wq", "wk", "wv"))
    heads = []
    for h in range(HEADS):
        s = scales[h % len(scales)]
        sl = slice(h * d, (h + 1) * d)
        groups = cells(grid, s)
        pk, real = pooled(k[..., sl], groups, keep)
        pv, _ = pooled(v[..., sl], groups, keep)
        scores = q[..., sl] @ pk.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(~real[:, None, :], float("-inf"))
        heads.append(torch.softmax(scores, -1) @ pv)
    return torch.cat(heads, -1) @ p["wo"].T


NAMES = {"qkv.q.weight": "wq", "qkv.k.weight": "wk", "qkv.v.weight": "wv",
         "o_proj.weight": "wo"}


@pytest.mark.parametrize("scales,grid,padded", [
    ((1, 2, 4), (4, 6), False),   # the default scales on an image (border cells of 4)
    ((1, 3), (5, 7), True),       # odd sides: clipped cells, and padding
    ((2, 2, 1, 3), (1, 11), True),  # a sequence: 1 x s cells
])
def test_medusa_equals_the_papers_equation(scales, grid, padded):
    gen = torch.Generator().manual_seed(len(scales) + grid[0])
    n = grid[0] * grid[1]
    p = {k: leaf(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) / DIM ** 0.5)
         for k in ("wq", "wk", "wv", "wo")}
    x = torch.randn(B, n, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, DIM, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, n, dtype=torch.bool)
    if padded:
        keep[0, :3] = False
        keep[1, -2:] = False
    xo = leaf(x)
    y_ref = formula(p, xo, scales, grid, keep)
    (y_ref * weight * keep[..., None]).sum().backward()

    attn = al.build("medusa", dim=DIM, heads=HEADS, scales=scales).double()
    own = dict(attn.named_parameters())
    assert set(own) == set(NAMES), "every parameter mapped"
    with torch.no_grad():
        for mine, theirs in NAMES.items():
            own[mine].copy_(p[theirs])
    xa = leaf(x)
    spatial = None if grid[0] == 1 else grid
    y = attn(xa, mask=keep if padded else None, spatial=spatial)
    (y * weight * keep[..., None]).sum().backward()
    real = keep[..., None]
    pairs = {"out": (y * real, y_ref * real), "grad x": (xa.grad, xo.grad)}
    for mine, theirs in NAMES.items():
        pairs[f"grad {mine}"] = (own[mine].grad, p[theirs].grad)
    assert_parity(pairs)


def test_pooling_keeps_float64():
    """The pooling matrix is built in the input's dtype: 1/3 is not rounded to float32."""
    from attnlab.mechanisms.medusa import pooling_matrix
    pool = pooling_matrix((1, 3), 3, None, 1, torch.device("cpu"), torch.float64)
    assert pool.dtype == torch.float64
    assert pool[0, 0, 0].item() == 1 / 3
