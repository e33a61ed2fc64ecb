"""lla against the authors' reference of Local Linear Attention (Yifei-Zuo/FlashLLA @ d104afa,
flashlla/ops/naive.py ``lla_forward_naive``; defaults from flashlla/ops/__init__.py
``lla_attention``).

The official code is an op, not a module: causal LLA of (batch, seqlen, head_dim) q, k, v,
with the kernel exp(c q.k - row max), omega, mu = sum w k - omega q, Sigma expanded as
sum w k k^T - mu~ q^T - q mu~^T + omega q q^T plus lambda omega I, rho = Sigma^-1 mu, the
denominator omega - mu.rho floored by delta_eps * sign (1e-12), s = w (1 - rho.k + rho.q) /
denominator. It is re-expressed here in float64 from reading that code (the reference solves
in float32; here in float64, see the differences). The module test wraps it in the plain
per-head projections a host model gives it (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.ops.lla import local_linear_attention

from .common import Official, assert_parity, compare_with_official, leaf, linear

OFFICIAL = Official(
    mechanism="lla",
    code="Yifei-Zuo/FlashLLA @ d104afa, flashlla/ops/naive.py, lla_forward_naive",
    differences=(
        "bidirectional unless causal=True (contract: a mechanism with both modes defaults to "
        "bidirectional; the official is causal only)",
        "no 1e-12 floor on the denominator (deliberate: attnlab's centred solve keeps it "
        "positive; the floor moves outputs by 1e-12 / denominator)",
        "solves in the input's precision (the reference casts Sigma and mu to float32 even for "
        "float64 inputs; the Triton kernel runs in bfloat16)",
    ),
)

B, N, DIM = 2, 9, 24
DELTA_EPS = 1e-12  # lla_attention's default


def official_lla(q, k, v, scale: float, ridge: float) -> torch.Tensor:
    """Causal LLA of (batch, n, d) q, k, v as the reference computes it (in float64)."""
    n, d = q.shape[-2], q.shape[-1]
    seen = torch.arange(n)[:, None] >= torch.arange(n)[None, :]
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    w = torch.exp(logits - logits.max(-1, keepdim=True).values)
    omega = w.sum(-1, keepdim=True)
    mu_raw = w @ k  # sum_j w_ij k_j
    mu = mu_raw - omega * q
    sigma = torch.einsum("bij,bjd,bje->bide", w, k, k)
    sigma = sigma - mu_raw[..., :, None] * q[..., None, :] - q[..., :, None] * mu_raw[..., None, :]
    sigma = sigma + omega[..., None] * q[..., :, None] * q[..., None, :]
    sigma = sigma + (ridge * omega)[..., None] * torch.eye(d, dtype=q.dtype)
    rho = torch.linalg.solve(sigma, mu)
    denom = omega - (mu * rho).sum(-1, keepdim=True)
    denom = denom + DELTA_EPS * torch.sign(denom)
    numer = 1 - rho @ k.transpose(-1, -2) + (rho * q).sum(-1, keepdim=True)
    return (w * numer / denom) @ v


def official_heads(q, k, v, scale, ridge):
    """(B, H, N, D) heads through the per-(batch, head) reference."""
    b, h, n, d = q.shape
    out = official_lla(*(t.reshape(b * h, n, d) for t in (q, k, v)), scale, ridge)
    return out.reshape(b, h, n, d)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("ridge,heads,d", [(10.0, 2, 6), (1.0, 1, 8), (3.0, 3, 4)])
def test_lla_op_equals_the_official_reference(backend, ridge, heads, d):
    gen = torch.Generator().manual_seed(50 + heads)
    q, k, v = (torch.randn(B, heads, N, d, generator=gen, dtype=torch.float64)
               for _ in range(3))
    weight = torch.randn(B, heads, N, d, generator=gen, dtype=torch.float64)
    off = [leaf(t) for t in (q, k, v)]
    y_off = official_heads(*off, d ** -0.5, ridge)
    (y_off * weight).sum().backward()
    mine = [leaf(t) for t in (q, k, v)]
    y = local_linear_attention(*mine, causal=True, ridge=ridge, backend=backend)
    (y * weight).sum().backward()
    pairs = {"out": (y, y_off)}
    pairs.update({f"grad {n}": (a.grad, o.grad) for n, a, o in zip("qkv", mine, off, strict=True)})
    assert_parity(pairs)


def official_params(heads: int, bias: bool, gen: torch.Generator) -> dict:
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * DIM ** -0.5
    p = {f"{n}.weight": w(DIM, DIM) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if bias:
        p.update({f"{n}.bias": w(DIM) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    return {k: leaf(v) for k, v in p.items()}


def official_module(p: dict, x: torch.Tensor, heads: int, ridge: float) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = (linear(p, f"{s}_proj", x).reshape(b, n, heads, -1).transpose(1, 2)
               for s in "qkv")
    o = official_heads(q, k, v, (DIM // heads) ** -0.5, ridge)
    return linear(p, "o_proj", o.transpose(1, 2).reshape(b, n, DIM))


@pytest.mark.parametrize("ridge,heads,bias", [(None, 4, False), (1.0, 2, True),
                                              (0.5, 3, False)])
def test_lla_module_equals_the_official_reference(ridge, heads, bias):
    gen = torch.Generator().manual_seed(60 + heads)
    p = official_params(heads, bias, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_module(p, xo, heads, 10.0 if ridge is None else ridge)
    (y_off * weight).sum().backward()

    kwargs = {} if ridge is None else {"ridge": ridge}  # None: attnlab's default ridge
    attn = al.build("lla", dim=DIM, heads=heads, causal=True, bias=bias, **kwargs).double()
    names = {f"qkv.{s}.{part}": f"{s}_proj.{part}" for s in "qkv" for part in ("weight", "bias")}
    names.update({f"o_proj.{part}": f"o_proj.{part}" for part in ("weight", "bias")})
    names = {mine: theirs for mine, theirs in names.items() if theirs in p}
    compare_with_official(attn, p, names, x, weight, y_off, xo)


def test_lla_defaults_are_the_official_ones():
    attn = al.build("lla", dim=32, heads=4)
    assert attn.ridge == 10.0  # lla_attention(ridge_lambda=10.0)
    assert attn.causal is False  # the contract's default; the official is causal only
    assert al.build("lla", dim=32, heads=4, causal=True).causal is True
