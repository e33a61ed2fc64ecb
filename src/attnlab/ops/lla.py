"""Local linear attention: the intercept of a weighted ridge regression at each query.

"Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention For
Test-Time Regression" (official code Yifei-Zuo/FlashLLA). For query i over its visible keys:

    w_ij = exp(c q_i.k_j),  z_ij = k_j - q_i,  omega = sum_j w_ij,  mu = sum_j w_ij z_ij,
    Sigma = sum_j w_ij z_ij z_ij^T + lambda omega I,   rho = Sigma^-1 mu,
    s_ij = w_ij (1 - rho.z_ij) / (omega - mu.rho),     o_i = sum_j s_ij v_j.

o_i is the intercept a of min_{a,b} sum_j w_ij (v_j - a - b^T z_ij)^2 + lambda omega |b|^2;
lambda -> inf gives softmax attention. attnlab computes the same intercept from the centred
regression: with kbar_i = sum_j w_ij k_j / omega (so z_ij - mu / omega = k_j - kbar_i),

    C = sum_j w_ij (k_j - kbar_i)(k_j - kbar_i)^T + lambda omega I,  beta = C^-1 (kbar_i - q_i),
    s_ij = w_ij (1 / omega - beta.(k_j - kbar_i)),

which avoids the cancellation of omega - mu.rho (both terms near omega when one key
dominates a sharp kernel: NaN in float32 at activations of 1e3) and keeps C >= lambda omega.
The cost is quadratic in L (plus a D x D solve per query); ``chunked`` bounds the memory,
not the cost.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.masks import visibility
from attnlab.ops.common import (
    begin_weights,
    checked_weights,
    default_scale,
    expand_kv,
    guarded_op,
    nan_where,
    shifted_exp,
    upcast,
)
from attnlab.ops.dispatch import choose
from attnlab.ops.tiled import TILE_ELEMENTS, keys_seen, recomputed

BACKENDS = ("chunked", "reference")  # in order of preference for backend="auto"


def _kernel(q: Tensor, k: Tensor, visible: Tensor | None, scale: float) -> Tensor:
    """w_ij = exp(c q.k) over visible keys, divided by the row max (s_ij does not change)."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return shifted_exp(logits)[0]


def _centred_solve(cov: Tensor, k_mean: Tensor, q: Tensor, omega: Tensor, ridge: float
                   ) -> Tensor:
    """beta = (cov + lambda omega I)^-1 (kbar - q) per query; rows with no key give 0.

    lambda omega is kept at least eps (omega + trace cov) of the dtype: a query that sees fewer
    keys than D has a singular cov, and a positive lambda below that floor is lost in rounding
    (the solve would fail or give inf). Any lambda the floor changes gives an output that
    rounding dominates anyway."""
    empty = omega == 0
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    floor = torch.finfo(cov.dtype).eps * (omega + cov.diagonal(dim1=-2, dim2=-1).sum(-1))
    c = cov + (torch.maximum(ridge * omega, floor) + empty.to(omega.dtype))[..., None, None] * eye
    return torch.linalg.solve(c, (k_mean - q).unsqueeze(-1)).squeeze(-1)


@checked_weights("lla_weights", options={"ridge": Arg("float", low=0, low_open=True)})
def lla_weights(q: Tensor, k: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                scale: float | None = None, ridge: float = 1.0) -> Tensor:
    """The s_ij of the equation, with the per-query differences k_j - kbar_i formed
    explicitly (the reference).

    Args:
        q: (B, H, Lq, D) queries; k: (B, H_kv, Lk, D) keys, H_kv dividing H (GQA).
        causal, mask: which keys each query sees, as in :func:`local_linear_attention`.
        scale: c of the kernel exp(c q.k), default 1/sqrt(D). ridge: lambda.

    Returns (B, H, Lq, Lk) in float32 at least (rows sum to 1; entries may be negative).
    """
    k, visible = begin_weights("lla_weights", q, k, causal=causal, mask=mask)
    scale = default_scale(q, scale)
    q, k = upcast(q, k)
    # a key holding a non-finite number is zeroed (a row that cannot see it stays finite:
    # its 0 weight times the key would still be NaN) and the rows that see it become NaN
    bad = ~torch.isfinite(k.sum(-1))  # (B, H, Lk)
    k = k.masked_fill(bad.unsqueeze(-1), 0)
    sees_bad = bad.unsqueeze(-2) if visible is None else visible & bad.unsqueeze(-2)
    w = _kernel(q, k, visible, scale)
    omega = w.sum(-1)
    inv_omega = torch.where(omega > 0, 1 / omega.clamp_min(1e-30), 0.0)
    k_mean = (w @ k) * inv_omega.unsqueeze(-1)  # (B, H, Lq, D)
    dev = k.unsqueeze(-3) - k_mean.unsqueeze(-2)  # (B, H, Lq, Lk, D): k_j - kbar_i
    cov = torch.einsum("...j,...jd,...je->...de", w, dev, dev)
    beta = _centred_solve(cov, k_mean, q, omega, ridge)
    out = w * (inv_omega.unsqueeze(-1) - (dev * beta.unsqueeze(-2)).sum(-1))
    return out + nan_where(sees_bad.any(-1), out)


def _outer_squares(k: Tensor) -> Tensor:
    """k_j k_j^T of each key, flattened: (.., J, D) -> (.., J, D * D)."""
    return (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)


class _SecondMoment(torch.autograd.Function):
    """S_q = sum_j w_qj k_j k_j^T, (.., Q, D, D), for w (.., Q, J) >= 0 and k (.., J, D).

    Over chunks of keys, each one GEMM of w against the chunk's k_j k_j^T (flattened to
    D^2 columns): memory O(chunk D^2) per head instead of the (Q, J, D) product of an
    einsum (536 MB per block of 64 queries at 4k keys, 8 heads, D = 64), and ~2.6x faster
    measured there. The backward goes over the same chunks:
    dw_qj = k_j^T G_q k_j and dk_j = (sum_q w_qj (G_q + G_q^T)) k_j with G = dL/dS."""

    @staticmethod
    def forward(ctx, w: Tensor, k: Tensor) -> Tensor:
        ctx.save_for_backward(w, k)
        d = k.shape[-1]
        chunk = _key_chunk(w, d)
        total = None
        with torch.autocast(w.device.type, enabled=False):  # in w's and k's dtype
            for j0 in range(0, k.shape[-2], chunk):
                part = w[..., j0:j0 + chunk] @ _outer_squares(k[..., j0:j0 + chunk, :])
                total = part if total is None else total.add_(part)
        assert total is not None  # at least one key
        return total.unflatten(-1, (d, d))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        w, k = ctx.saved_tensors
        d = k.shape[-1]
        chunk = _key_chunk(w, d)
        grad = grad.to(w.dtype)
        g = grad.flatten(-2)  # (.., Q, D^2)
        sym = (grad + grad.transpose(-1, -2)).flatten(-2)
        grad_w, grad_k = torch.empty_like(w), torch.empty_like(k)
        with torch.autocast(w.device.type, enabled=False):
            for j0 in range(0, k.shape[-2], chunk):
                kc = k[..., j0:j0 + chunk, :]
                grad_w[..., j0:j0 + chunk] = g @ _outer_squares(kc).transpose(-1, -2)
                m = (w[..., j0:j0 + chunk].transpose(-1, -2) @ sym).unflatten(-1, (d, d))
                grad_k[..., j0:j0 + chunk, :] = (m @ kc.unsqueeze(-1)).squeeze(-1)
        return grad_w, grad_k


def _key_chunk(w: Tensor, d: int) -> int:
    """Keys per chunk of ``_SecondMoment``: k_j k_j^T of every head within TILE_ELEMENTS
    (256 keys at 8 heads, D = 64, measured fastest of 64 to 512)."""
    return max(16, TILE_ELEMENTS // max(1, w[..., 0, 0].numel() * d * d))


def _block(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float,
           ridge: float) -> Tensor:
    """o for a block of queries without forming an (Lq, Lk, D) tensor: the weighted
    covariance is sum_j w k k^T - omega kbar kbar^T (its rounding is bounded by the ridge
    term that C keeps), and beta.(k_j - kbar_i) = k_j.beta - kbar_i.beta."""
    q32, k32 = upcast(q, k)
    w = _kernel(q32, k32, visible, scale)
    omega = w.sum(-1)
    inv_omega = torch.where(omega > 0, 1 / omega.clamp_min(1e-30), 0.0)
    k_mean = (w @ k32) * inv_omega.unsqueeze(-1)
    second = _SecondMoment.apply(w.to(k32.dtype), k32)  # w is autocast's dtype under it
    cov = second - omega[..., None, None] * k_mean.unsqueeze(-1) * k_mean.unsqueeze(-2)
    beta = _centred_solve(cov, k_mean, q32, omega, ridge)
    s = w * (inv_omega.unsqueeze(-1) + (k_mean * beta).sum(-1, keepdim=True)
             - beta @ k32.transpose(-1, -2))
    return s.to(v.dtype) @ v


def _chunk(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, i0: int, lq: int, lk: int,
           causal: bool, scale: float, ridge: float) -> Tensor:
    """``_block`` for the queries i0 .. i0 + len(q) of ``lq`` over the first len(k) of ``lk``
    keys, its visibility built here: under ``recomputed`` the backward builds it again
    instead of autograd keeping one (block, keys) bool tensor per block, L^2 / 2 bytes in
    all (268 MB at 16k)."""
    vis = visibility(q.shape[2], lk, causal=causal, mask=mask, device=q.device, q_start=i0,
                     q_total=lq)
    return _block(q, k, v, None if vis is None else vis[..., :k.shape[2]], scale, ridge)


@guarded_op("local_linear_attention", options={
    "ridge": Arg("float", low=0, low_open=True), "block_size": Arg("int", low=1)})
def local_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                           mask: Tensor | None = None, scale: float | None = None,
                           ridge: float = 1.0, backend: str = "auto",
                           block_size: int = 64) -> Tensor:
    """Local linear attention on (B, H, L, D) tensors (k, v may have fewer heads: GQA).

    ``ridge`` is lambda, > 0 (at 0 the covariance of a query that sees fewer than D keys is
    singular; lambda -> 0 is a limit, take a small positive value). Backends: ``reference``
    (dense, explicit z), ``chunked`` (default: blocks of ``block_size`` queries, recomputed in
    the backward; memory O(block L + chunk D^2) per head, time still quadratic in L).
    """
    backend = choose("local_linear_attention", backend, BACKENDS, q, k, v)
    if not ridge > 0:  # lambda = 0: a query with fewer visible keys than D has a singular Sigma
        raise ValueError(f"local_linear_attention: ridge must be > 0, got {ridge}")
    scale = default_scale(q, scale)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    lq, lk = q.shape[2], k.shape[2]
    if backend == "reference":
        w = lla_weights(q, k, causal=causal, mask=mask, scale=scale, ridge=ridge)
        return w.to(v.dtype) @ v
    outs = []
    # split, not slicing, for the queries: one gradient concatenation instead of one
    # full-length gradient per block
    for q_blk, i0 in zip(q.split(block_size, 2), range(0, lq, block_size), strict=True):
        i1 = i0 + q_blk.shape[2]
        kend = keys_seen(i1, lq, lk, causal)
        if kend <= 0:
            outs.append(v.new_zeros(*v.shape[:2], i1 - i0, v.shape[-1]))
            continue
        fn = partial(_chunk, i0=i0, lq=lq, lk=lk, causal=causal, scale=scale, ridge=ridge)
        outs.append(recomputed(fn, q_blk, k[:, :, :kend], v[:, :, :kend], mask))
    return torch.cat(outs, dim=2)
