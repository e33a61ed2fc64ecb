"""softplus (LSSA / LSSAR) has no official code to compare with: the paper, "Softplus Attention
with Re-weighting Boosts Length Extrapolation in Large Language Models", names no released
implementation that could be found (code search, December 2026), so the module is checked
against its equations, re-expressed here in float64 token by token:

    LSSA:  A_ij = softplus(ln(d) ln(N_i) q̂_i . k̂_j) for the N_i keys row i sees (q̂, k̂:
           per-head L2-normalised), rows L1-normalised;
    LSSAR: A_ij <- relu(N_i A_ij - 1)^p, rows L1-normalised again, the "- 1" left out for the
           paper's first 3 rows (rows that see at most 3 keys).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab as al

from .common import Official, compare_with_official, leaf

OFFICIAL = Official(
    mechanism="softplus",
    code="none: no implementation by the authors could be found (paper without code link)",
    checked_against="the paper's LSSA and LSSAR equations re-expressed row by row in float64 "
                    "(output, input and parameter gradients)",
)

B, N, DIM, HEADS = 2, 9, 24, 4
NAMES = {f"qkv.{t}.weight": f"{t}.weight" for t in "qkv"} | {"o_proj.weight": "o.weight"}


def paper_forward(p, x, keep, causal: bool, power: float | None):
    b, n, _ = x.shape
    hd = DIM // HEADS

    def heads(name):
        return (x @ p[f"{name}.weight"].T).view(b, n, HEADS, hd)

    q, k, v = F.normalize(heads("q"), dim=-1), F.normalize(heads("k"), dim=-1), heads("v")
    out = torch.zeros(b, n, HEADS, hd, dtype=x.dtype)
    for bi in range(b):
        for i in range(n):
            if not keep[bi, i]:
                continue
            seen = [j for j in range(n) if keep[bi, j] and (not causal or j <= i)]
            count = len(seen)
            s = math.log(hd) * math.log(count) * torch.einsum(
                "hd,khd->hk", q[bi, i], k[bi, seen])
            a = F.softplus(s)
            a = a / a.sum(-1, keepdim=True)
            if power is not None:
                shift = 0.0 if count <= 3 else 1.0
                a = torch.relu(count * a - shift) ** power
                a = a / a.sum(-1, keepdim=True)
            out[bi, i] = torch.einsum("hk,khd->hd", a, v[bi, seen])
    return out.reshape(b, n, DIM) @ p["o.weight"].T


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("power", [None, 3.0, 15.0])
def test_softplus_equals_the_papers_equations(causal, power):
    gen = torch.Generator().manual_seed(7 + int(power or 0) + causal)
    # queries and keys made alike so that LSSAR's rows keep more than one key at p = 15
    base = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * DIM ** -0.5
    p = {"q.weight": base + 0.3 * torch.randn(DIM, DIM, generator=gen, dtype=torch.float64),
         "k.weight": base.clone(),
         "v.weight": torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * DIM ** -0.5,
         "o.weight": torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) * DIM ** -0.5}
    p = {k: leaf(v) for k, v in p.items()}
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 7:] = False
    weight = weight * keep[..., None]
    xo = leaf(x)
    y_off = paper_forward(p, xo, keep, causal, power)
    (y_off * weight).sum().backward()

    attn = al.build("softplus", dim=DIM, heads=HEADS, causal=causal,
                    reweight_p=power).double()

    compare_with_official(attn, p, NAMES, x, weight, y_off, xo, mask=keep)
