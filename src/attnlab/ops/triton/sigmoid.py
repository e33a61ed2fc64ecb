"""Sigmoid attention in Triton (FlashSigmoid style): ``backend="triton"`` of
:func:`attnlab.ops.sigmoid_attention`.

Forward, for query row i of head h (kv head h // G, G = H / H_kv query heads per kv head)::

    S_ij = c q_i . k_j + b_h,   P_ij = sigmoid(S_ij) if key j is visible to i else 0,
    O_i  = sum_j P_ij v_j

Backward, with dO the output's gradient::

    dP = dO V^T,   dS = P (1 - P) dP,   dQ = c dS K,   dK = c dS^T Q,   dV = P^T dO,
    db_h = sum over (batch, i, j) of dS (per-head tensor bias only)

No row max, row sum or log-sum-exp: the rows are not normalised, so the forward is one pass
over the key tiles of each query tile and the backward needs no D = rowsum(dO * O) pass
(dS depends on P and dP only).

Tiling: the forward and dQ kernels run one program per (query tile of BM rows, batch, head)
and loop over key tiles of BN keys; the dK/dV kernel runs one program per (key tile, batch,
kv head) and loops over the G query heads that share the kv head and their query tiles, so
each gradient is written by exactly one program (no atomics) and GQA's kv heads are indexed
in the kernel, never repeated. The per-head bias gradient is summed per key tile by the
dK/dV kernel and over the tiles in torch. Causal (queries aligned to the end of the keys:
row i sees keys j <= i + Lk - Lq) skips the key tiles past the diagonal (forward, dQ) and
the query tiles before it (dK/dV). Visibility inside a tile is the key range, the causal
rule and an optional bool mask broadcastable to (B, H, Lq, Lk), read through its strides
(0 on broadcast axes: a key padding mask (B, 1, 1, Lk) is never materialised). Head dims are
padded to a power of two >= 16 (``tl.dot``'s minimum) with masked loads; scores,
sigmoids and gradients accumulate in float32; P and dS are rounded to the inputs' dtype
before their products with V, dO, K and Q (as the reference rounds the weights to V's
dtype). float32 products use Triton's default dot precision (tf32 on a GPU unless
``TRITON_F32_DEFAULT=ieee``).

Custom ops (issue 42): the kernels are PyTorch operators, ``attnlab::sigmoid_triton_fwd``
and ``attnlab::sigmoid_triton_bwd`` (``torch.library.custom_op``), each with a fake kernel
(its outputs' shapes and dtypes), the forward's gradient registered with
``register_autograd`` as a call of the backward op. ``torch.compile(fullgraph=True)`` and
``torch.export`` then record one opaque node per call instead of failing inside Triton's
launcher. The other Triton modules (linear, decode, ...) follow the same convention.

Why ``custom_op`` and not ``torch.library.triton_op`` + ``wrap_triton`` (which would let
inductor see into the kernels): under Triton's interpreter, ``wrap_triton`` returns the
kernel unwrapped (an ``InterpretedFunction`` carries none of the JIT metadata it needs), so
tracing a ``triton_op`` runs its body on fake tensors and fails with "Cannot access data
pointer of Tensor" (checked with torch 2.13 and triton 3.9, CPU tensors). The traced path
could then be tested only on a GPU, while CI has none. A ``custom_op`` is opaque, so it
traces the same way whatever Triton runs underneath (the interpreter, 3.9 here, 3.6 on the
lent GPUs), and its host code (tile choice, the mask's uint8 view, the per-tile bias sums)
stays ordinary Python that is never traced. What we give up is inductor fusing around or
re-tuning the kernels; an attention kernel dominates the time of its call, so there is
little to fuse. The price of an opaque op is a hand-written fake kernel, which
``torch.library.opcheck`` checks against the real outputs (tests/triton/test_custom_ops.py).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.ops.triton import interpreting
from attnlab.ops.triton.common import (
    key_program,
    key_tile,
    mask_strides,
    padded,
    query_program,
    store_tile,
    tile,
    tile_t,
    visible,
)


@triton.jit
def _probs(q, k_base, mask_base, start_n, offs_m, offs_d, skn, skd, smm, smn,
           Lq, Lk, D, off, scale, bias,
           CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BN: tl.constexpr):
    """One key tile of a query tile (forward and dQ): its key indices, K^T and
    P = sigmoid(c Q K^T + b) (BM, BN), 0 where a key is not visible."""
    offs_n, kt = key_tile(k_base, start_n, offs_d, skn, skd, Lk, D, BN)
    p = tl.sigmoid(tl.dot(q, kt) * scale + bias)
    vis = visible(offs_m[:, None], offs_n[None, :], Lq, Lk, off, mask_base, smm, smn, CAUSAL,
                  HAS_MASK)
    return offs_n, kt, tl.where(vis, p, 0.0)


@triton.jit
def _sigmoid_fwd(Q, K, V, Bias, Mask, O,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
                 sob, soh, som, soe, smb, smh, smm, smn,
                 G, Lq, Lk, D, Dv, scale,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    (pid_m, b, h, offs_m, offs_d, offs_e, q, k_base, v_base, mask_base,
     off) = query_program(Q, K, V, Mask, sqb, sqh, sqm, sqd, skb, skh, svb, svh, smb, smh, G,
                          Lq, Lk, D, BM, BD, BE)
    bias = tl.load(Bias + h)
    hi = Lk
    if CAUSAL:  # the last row of this tile sees keys < (pid_m + 1) BM + off
        hi = tl.minimum((pid_m + 1) * BM + off, Lk)
    acc = tl.zeros((BM, BE), dtype=tl.float32)
    for start_n in range(0, hi, BN):
        offs_n, kt, p = _probs(q, k_base, mask_base, start_n, offs_m, offs_d, skn, skd, smm,
                               smn, Lq, Lk, D, off, scale, bias, CAUSAL, HAS_MASK, BN)
        v = tile(v_base, offs_n, offs_n[:, None] < Lk, offs_e, svn, sve, Dv)
        acc += tl.dot(p.to(v.dtype), v)
    store_tile(O + b * sob + h * soh, acc.to(O.dtype.element_ty), offs_m, offs_m[:, None] < Lq,
               offs_e, som, soe, Dv)


@triton.jit
def _sigmoid_bwd_dq(Q, K, V, Bias, Mask, DO, DQ,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
                    sdob, sdoh, sdom, sdoe, sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
                    G, Lq, Lk, D, Dv, scale,
                    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    (pid_m, b, h, offs_m, offs_d, offs_e, q, k_base, v_base, mask_base,
     off) = query_program(Q, K, V, Mask, sqb, sqh, sqm, sqd, skb, skh, svb, svh, smb, smh, G,
                          Lq, Lk, D, BM, BD, BE)
    do = tile(DO + b * sdob + h * sdoh, offs_m, offs_m[:, None] < Lq, offs_e, sdom, sdoe, Dv)
    bias = tl.load(Bias + h)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BM + off, Lk)
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    for start_n in range(0, hi, BN):
        offs_n, kt, p = _probs(q, k_base, mask_base, start_n, offs_m, offs_d, skn, skd, smm,
                               smn, Lq, Lk, D, off, scale, bias, CAUSAL, HAS_MASK, BN)
        vt = tile_t(v_base, offs_n, offs_n[None, :] < Lk, offs_e, svn, sve, Dv)
        ds = p * (1.0 - p) * tl.dot(do, vt)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    store_tile(DQ + b * sdqb + h * sdqh, (dq * scale).to(DQ.dtype.element_ty), offs_m,
               offs_m[:, None] < Lq, offs_d, sdqm, sdqd, D)


@triton.jit
def _sigmoid_bwd_dkdv(Q, K, V, Bias, Mask, DO, DK, DV, DB,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
                      sdob, sdoh, sdom, sdoe, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdve,
                      smb, smh, smm, smn, sdbb, sdbh,
                      H, G, Lq, Lk, D, Dv, scale,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      BE: tl.constexpr):
    pid_n, b, hk, offs_n, offs_d, offs_e, k, v, off, lo = key_program(
        K, V, skb, skh, skn, skd, svb, svh, svn, sve, Lq, Lk, D, Dv, CAUSAL, BM, BN, BD, BE)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dv = tl.zeros((BN, BE), dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = Mask + b * smb + h * smh
        bias = tl.load(Bias + h)
        db = tl.zeros((BN,), dtype=tl.float32)
        for start_m in range(lo, Lq, BM):
            offs_m = start_m + tl.arange(0, BM)
            qt = tile_t(q_base, offs_m, offs_m[None, :] < Lq, offs_d, sqm, sqd, D)
            pt = tl.sigmoid(tl.dot(k, qt) * scale + bias)  # (BN, BM): P^T
            vis = visible(offs_m[None, :], offs_n[:, None], Lq, Lk, off, mask_base, smm,
                          smn, CAUSAL, HAS_MASK)
            pt = tl.where(vis, pt, 0.0)
            do = tile(do_base, offs_m, offs_m[:, None] < Lq, offs_e, sdom, sdoe, Dv)
            dv += tl.dot(pt.to(do.dtype), do)
            dst = pt * (1.0 - pt) * tl.dot(v, tl.trans(do))  # (BN, BM): dS^T
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
            if BIAS_GRAD:
                db += tl.sum(dst, axis=1)
        if BIAS_GRAD:
            tl.store(DB + b * sdbb + h * sdbh + pid_n, tl.sum(db, axis=0))
    keys = offs_n[:, None] < Lk
    store_tile(DK + b * sdkb + hk * sdkh, (dk * scale).to(DK.dtype.element_ty), offs_n, keys,
               offs_d, sdkn, sdkd, D)
    store_tile(DV + b * sdvb + hk * sdvh, dv.to(DV.dtype.element_ty), offs_n, keys, offs_e,
               sdvn, sdve, Dv)


def _tiles(bd: int, block_size: int | None) -> dict[str, tuple[int, int, int, int]]:
    """(BM, BN, num_warps, num_stages) of each kernel for a padded head dim ``bd``."""
    if block_size is not None:
        one = (block_size, block_size, 4, 2)
        return {"fwd": one, "dq": one, "dkdv": one}
    if interpreting():  # small tiles: the tests cross several tiles at small lengths
        one = (16, 16, 1, 1)
        return {"fwd": one, "dq": one, "dkdv": one}
    # untuned first guesses (not yet run on a GPU): the dK/dV and dQ accumulators live in
    # registers, so their tiles narrow as the head dim grows
    wide, widest = bd > 64, bd > 128
    warps = 8 if wide else 4
    return {"fwd": (64 if widest else 128, 32 if wide else 64, warps, 3),
            "dq": (32 if widest else 64, 32, warps, 2),
            "dkdv": (32, 32 if widest else 64, warps, 2)}


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None,
             scale: float, causal: bool, block_size: int | None) -> Tensor:
    B, H, Lq, D = q.shape
    G, Lk, Dv = H // k.shape[1], k.shape[2], v.shape[3]
    BD, BE = padded(D), padded(Dv)
    BM, BN, warps, stages = _tiles(max(BD, BE), block_size)["fwd"]
    o = torch.empty((B, H, Lq, Dv), dtype=v.dtype, device=q.device)
    m, ms = mask_strides(mask, (B, H, Lq, Lk))
    _sigmoid_fwd[(triton.cdiv(Lq, BM), B, H)](
        q, k, v, bias, q if m is None else m, o,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *ms,
        G, Lq, Lk, D, Dv, scale, CAUSAL=causal, HAS_MASK=m is not None,
        BM=BM, BN=BN, BD=BD, BE=BE, num_warps=warps, num_stages=stages)
    return o


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
              mask: Tensor | None, scale: float, causal: bool, block_size: int | None,
              bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    BD, BE = padded(D), padded(Dv)
    tiles = _tiles(max(BD, BE), block_size)
    m, ms = mask_strides(mask, (B, H, Lq, Lk))
    mptr = q if m is None else m
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    BM, BN, warps, stages = tiles["dq"]
    _sigmoid_bwd_dq[(triton.cdiv(Lq, BM), B, H)](
        q, k, v, bias, mptr, do, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *ms,
        G, Lq, Lk, D, Dv, scale, CAUSAL=causal, HAS_MASK=m is not None,
        BM=BM, BN=BN, BD=BD, BE=BE, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = tiles["dkdv"]
    nt = triton.cdiv(Lk, BN)
    db = torch.zeros((B, H, nt), dtype=torch.float32, device=q.device) if bias_grad else q
    _sigmoid_bwd_dkdv[(nt, B, Hkv)](
        q, k, v, bias, mptr, do, dk, dv, db,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *ms, db.stride(0), db.stride(1),
        H, G, Lq, Lk, D, Dv, scale, CAUSAL=causal, HAS_MASK=m is not None,
        BIAS_GRAD=bias_grad, BM=BM, BN=BN, BD=BD, BE=BE, num_warps=warps,
        num_stages=stages)
    return dq, dk, dv, db.sum((0, 2)) if bias_grad else None


# The kernels as PyTorch custom ops (see the module docstring): each op has a fake kernel
# (its outputs' shapes and dtypes) and the forward op its autograd formula.


@torch.library.custom_op("attnlab::sigmoid_triton_fwd", mutates_args=())
def sigmoid_fwd_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None,
                   scale: float, causal: bool, block_size: int | None) -> Tensor:
    """The forward kernel: O (B, H, Lq, Dv) in v's dtype; ``bias`` the (H,) float32 b."""
    return _forward(q, k, v, bias, mask, scale, causal, block_size)


@sigmoid_fwd_op.register_fake
def _sigmoid_fwd_fake(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None,
                      scale: float, causal: bool, block_size: int | None) -> Tensor:
    return q.new_empty((*q.shape[:3], v.shape[3]), dtype=v.dtype)


@torch.library.custom_op("attnlab::sigmoid_triton_bwd", mutates_args=())
def sigmoid_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                   mask: Tensor | None, scale: float, causal: bool, block_size: int | None,
                   bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward kernels: dQ, dK, dV (the inputs' shapes and dtypes) and db, the (H,)
    float32 gradient of the per-head bias (zeros when ``bias_grad`` is False: not computed)."""
    dq, dk, dv, db = _backward(do, q, k, v, bias, mask, scale, causal, block_size, bias_grad)
    return dq, dk, dv, torch.zeros_like(bias) if db is None else db


@sigmoid_bwd_op.register_fake
def _sigmoid_bwd_fake(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                      mask: Tensor | None, scale: float, causal: bool, block_size: int | None,
                      bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bias, dtype=torch.float32))


def _sigmoid_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, k, v, bias, mask, scale, causal, block_size = inputs
    ctx.save_for_backward(q, k, v, bias, mask)
    ctx.scale, ctx.causal, ctx.block_size = scale, causal, block_size


def _sigmoid_grad(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, bias, mask = ctx.saved_tensors
    bias_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, db = sigmoid_bwd_op(do, q, k, v, bias, mask, ctx.scale, ctx.causal,
                                    ctx.block_size, bias_grad)
    # the backward op has no autograd formula of its own: a second derivative raises
    return dq, dk, dv, db if bias_grad else None, None, None, None, None


sigmoid_fwd_op.register_autograd(_sigmoid_grad, setup_context=_sigmoid_setup)


def head_bias(bias: float | Tensor, heads: int, device: torch.device) -> Tensor:
    """b as an (H,) float32 vector: a float repeated, or a per-head tensor (1, H or 1, 1, 1)
    (any fewer leading dims) flattened, its gradient flowing back through the reshape."""
    if not isinstance(bias, Tensor):
        return torch.full((heads,), float(bias), dtype=torch.float32, device=device)
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return b4.to(torch.float32).expand(1, heads, 1, 1).reshape(heads).contiguous()


def sigmoid_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                             mask: Tensor | None, scale: float, bias: float | Tensor,
                             block_size: int | None = None) -> Tensor:
    """O = sigmoid(c Q K^T + b) V over the visible keys (0 weight elsewhere), in Triton.

    q (B, H, Lq, D); k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv) with H_kv dividing H (GQA kv
    heads are indexed in the kernels, not repeated); ``mask`` bool, broadcastable to
    (B, H, Lq, Lk); ``bias`` a float or a per-head tensor (see :func:`head_bias`);
    ``block_size`` a power of two >= 16 for both tile sides, else per-kernel defaults.
    The op (:func:`attnlab.ops.sigmoid_attention`) checks all of this before calling.
    Returns (B, H, Lq, Dv) in v's dtype; differentiable in q, k, v and a tensor bias.
    """
    b = head_bias(bias, q.shape[1], q.device)
    return sigmoid_fwd_op(q, k, v, b, mask, float(scale), bool(causal), block_size)
