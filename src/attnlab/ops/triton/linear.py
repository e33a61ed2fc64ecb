"""Chunked linear attention in Triton: ``linear_attention(..., backend="triton")``.

The kernels compute the two sums of linear attention on feature-mapped inputs
(``fq = phi(q)``, ``fk = phi(k)``, already masked: padded keys are zero rows),

    num_i = sum_{j in vis(i)} (fq_i . fk_j) v_j   = fq_i S_i,   S_i = sum_{j in vis(i)} fk_j v_j^T
    den_i = sum_{j in vis(i)}  fq_i . fk_j        = fq_i . z_i, z_i = sum_{j in vis(i)} fk_j

with vis(i) = {j <= i} (causal, Lq = Lk) or every key (bidirectional); the op then divides
(``safe_divide``) or keeps the numerator.

Tiling (the chunk form of fla's chunk kernels, written anew): the sequence is cut into chunks
of C tokens (C = ``chunk``, a power of two >= 16 so that ``tl.dot`` compiles on a GPU); head
dims are padded to powers of two >= 16 inside the kernels (masked loads, zero padding).

- ``_states``, one program per (batch, kv head), walks the chunks in order and stores the
  state *before* each chunk, S_c = sum_{j < cC} fk_j v_j^T (Dk x Dv) and z_c (Dk), in fp32;
  bidirectional: one state, the sum over every key.
- ``_outputs``, one program per (chunk, batch, query head): the inter-chunk part from the
  carried state, fq_c S_c and fq_c z_c, plus (causal) the intra-chunk part as a masked
  (C x C) product A = tril(fq_c fk_c^T): A v_c and A 1.
- Backward, with dnum = dO and dden = dd (the op's division is autograd's): ``_states``
  again (the forward keeps no states: Lk / C fp32 tiles per head would outweigh one more
  pass over k and v); ``_states_back`` walks the chunks backwards per (batch, query head)
  and stores the state *after* each chunk, dS_c = sum_{i >= (c+1)C} fq_i dO_i^T and
  dz_c = sum_i dd_i fq_i over the same rows;
  ``_grad_q`` (per chunk): dfq_c = dO_c S_c^T + dd_c z_c^T + tril(dO_c v_c^T + dd_c 1^T) fk_c;
  ``_grad_kv`` (per chunk): dfk_c = v_c dS_c^T + 1 dz_c^T + tril(..)^T fq_c and
  dv_c = fk_c dS_c + A^T dO_c. dQ and dK/dV are separate kernels, so nothing is written
  twice (no atomics); with GQA the key/value gradients are written per query head and summed
  over each kv head's group afterwards.

GQA: the kernels index the kv head of each query head (h // (H / H_kv)); k and v are not
repeated. The kernels load fp32 or lower-precision inputs and cast them to fp32 (the op
passes fp32: it upcasts before the feature map, as its other forms do); every product
accumulates in fp32, ``tl.dot`` in full fp32 unless torch allows TF32.
Triton is imported here only, when the op runs with ``backend="triton"``.

Custom ops (issue 42): ``attnlab::linear_triton_fwd`` (num, den) and
``attnlab::linear_triton_bwd`` (the gradients of fq, fk, v) are ``torch.library.custom_op``
operators with fake kernels, the forward's gradient registered with ``register_autograd``, so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node per call.
``custom_op`` rather than ``triton_op``: a ``triton_op`` cannot be traced under Triton's
interpreter, where CI tests the kernels (the reasons in full: ``attnlab.ops.triton.sigmoid``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.ops.triton.common import padded, store_tile, tile


@triton.jit
def _chunk(base, rows, cols, L, W):
    """The (rows, cols) tile, as fp32, of a contiguous (L, W) matrix at ``base``: rows < L
    and columns < W loaded, the padding 0."""
    return tile(base, rows, rows[:, None] < L, cols, W, 1, W).to(tl.float32)


@triton.jit
def _put_chunk(base, x, rows, cols, L, W):
    """Store the (rows, cols) tile ``x`` into a contiguous (L, W) matrix at ``base``."""
    store_tile(base, x, rows, rows[:, None] < L, cols, W, 1, W)


@triton.jit
def _kv_head(bh, H, HKV):
    """The (batch * kv heads) index of the kv head of ``bh`` (batch * query heads)."""
    return (bh // H) * HKV + (bh % H) // (H // HKV)


@triton.jit
def _state(s_ptr, z_ptr, bh, c, NT, rk, rv, BK: tl.constexpr, BV: tl.constexpr,
           CAUSAL: tl.constexpr):
    """The state (S, z) that chunk c of ``bh`` uses: its own (causal) or the one state."""
    state = c if CAUSAL else 0
    s = tl.load(s_ptr + (bh * NT + state) * BK * BV + rk[:, None] * BV + rv[None, :])
    z = tl.load(z_ptr + (bh * NT + state) * BK + rk)
    return s, z


@triton.jit
def _states(k_ptr, v_ptr, s_ptr, z_ptr, L, NT, DK: tl.constexpr, DV: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CAUSAL: tl.constexpr,
            PREC: tl.constexpr):
    bh = tl.program_id(0)  # batch * kv heads
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    k_base, v_base = k_ptr + bh * L * DK, v_ptr + bh * L * DV
    s_base = s_ptr + bh * NT * BK * BV + rk[:, None] * BV + rv[None, :]
    z_base = z_ptr + bh * NT * BK + rk
    s = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    for c in range(0, tl.cdiv(L, BT)):
        if CAUSAL:  # the state before chunk c
            tl.store(s_base + c * BK * BV, s)
            tl.store(z_base + c * BK, z)
        rows = c * BT + rt
        kc = _chunk(k_base, rows, rk, L, DK)
        vc = _chunk(v_base, rows, rv, L, DV)
        s += tl.dot(tl.trans(kc), vc, input_precision=PREC)
        z += tl.sum(kc, 0)
    if not CAUSAL:  # one state: every key
        tl.store(s_base, s)
        tl.store(z_base, z)


@triton.jit
def _outputs(q_ptr, k_ptr, v_ptr, s_ptr, z_ptr, o_ptr, d_ptr, LQ, LK, NT, H, HKV,
             DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, CAUSAL: tl.constexpr,
             PREC: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)  # chunk, batch * query heads
    bhk = _kv_head(bh, H, HKV)
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    rows = c * BT + rt
    qc = _chunk(q_ptr + bh * LQ * DK, rows, rk, LQ, DK)
    s, z = _state(s_ptr, z_ptr, bhk, c, NT, rk, rv, BK, BV, CAUSAL)
    o = tl.dot(qc, s, input_precision=PREC)
    d = tl.sum(qc * z[None, :], 1)
    if CAUSAL:  # the chunk's own keys (LQ == LK): tril(q k^T)
        kc = _chunk(k_ptr + bhk * LK * DK, rows, rk, LK, DK)
        vc = _chunk(v_ptr + bhk * LK * DV, rows, rv, LK, DV)
        a = tl.dot(qc, tl.trans(kc), input_precision=PREC)
        a = tl.where(rt[:, None] >= rt[None, :], a, 0.0)
        o += tl.dot(a, vc, input_precision=PREC)
        d += tl.sum(a, 1)
    _put_chunk(o_ptr + bh * LQ * DV, o, rows, rv, LQ, DV)
    tl.store(d_ptr + bh * LQ + rows, d, mask=rows < LQ)


@triton.jit
def _states_back(q_ptr, do_ptr, dd_ptr, s_ptr, z_ptr, L, NT, DK: tl.constexpr,
                 DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 CAUSAL: tl.constexpr,
                 PREC: tl.constexpr):
    bh = tl.program_id(0)  # batch * query heads
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    s_base = s_ptr + bh * NT * BK * BV + rk[:, None] * BV + rv[None, :]
    z_base = z_ptr + bh * NT * BK + rk
    s = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    n = tl.cdiv(L, BT)
    for i in range(0, n):
        c = n - 1 - i
        if CAUSAL:  # the state after chunk c
            tl.store(s_base + c * BK * BV, s)
            tl.store(z_base + c * BK, z)
        rows = c * BT + rt
        qc = _chunk(q_ptr + bh * L * DK, rows, rk, L, DK)
        doc = _chunk(do_ptr + bh * L * DV, rows, rv, L, DV)
        ddc = tl.load(dd_ptr + bh * L + rows, mask=rows < L, other=0.0).to(tl.float32)
        s += tl.dot(tl.trans(qc), doc, input_precision=PREC)
        z += tl.sum(qc * ddc[:, None], 0)
    if not CAUSAL:
        tl.store(s_base, s)
        tl.store(z_base, z)


@triton.jit
def _grad_q(k_ptr, v_ptr, do_ptr, dd_ptr, s_ptr, z_ptr, dq_ptr, LQ, LK, NT, H, HKV,
            DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, CAUSAL: tl.constexpr,
            PREC: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    bhk = _kv_head(bh, H, HKV)
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    rows = c * BT + rt
    doc = _chunk(do_ptr + bh * LQ * DV, rows, rv, LQ, DV)
    ddc = tl.load(dd_ptr + bh * LQ + rows, mask=rows < LQ, other=0.0).to(tl.float32)
    s, z = _state(s_ptr, z_ptr, bhk, c, NT, rk, rv, BK, BV, CAUSAL)
    dq = tl.dot(doc, tl.trans(s), input_precision=PREC) + ddc[:, None] * z[None, :]
    if CAUSAL:
        kc = _chunk(k_ptr + bhk * LK * DK, rows, rk, LK, DK)
        vc = _chunk(v_ptr + bhk * LK * DV, rows, rv, LK, DV)
        # d(q_i . k_j), rows i, columns j
        p = tl.dot(doc, tl.trans(vc), input_precision=PREC) + ddc[:, None]
        p = tl.where(rt[:, None] >= rt[None, :], p, 0.0)
        dq += tl.dot(p, kc, input_precision=PREC)
    _put_chunk(dq_ptr + bh * LQ * DK, dq, rows, rk, LQ, DK)


@triton.jit
def _grad_kv(q_ptr, k_ptr, v_ptr, do_ptr, dd_ptr, s_ptr, z_ptr, dk_ptr, dv_ptr, LQ, LK, NT,
             H, HKV, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, CAUSAL: tl.constexpr,
             PREC: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)  # key chunk, batch * query heads
    bhk = _kv_head(bh, H, HKV)
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    rows = c * BT + rt
    kc = _chunk(k_ptr + bhk * LK * DK, rows, rk, LK, DK)
    vc = _chunk(v_ptr + bhk * LK * DV, rows, rv, LK, DV)
    s, z = _state(s_ptr, z_ptr, bh, c, NT, rk, rv, BK, BV, CAUSAL)
    dk = tl.dot(vc, tl.trans(s), input_precision=PREC) + z[None, :]
    dv = tl.dot(kc, s, input_precision=PREC)
    if CAUSAL:  # the chunk's own queries (LQ == LK), rows i, columns j
        qc = _chunk(q_ptr + bh * LQ * DK, rows, rk, LQ, DK)
        doc = _chunk(do_ptr + bh * LQ * DV, rows, rv, LQ, DV)
        ddc = tl.load(dd_ptr + bh * LQ + rows, mask=rows < LQ, other=0.0).to(tl.float32)
        lower = rt[:, None] >= rt[None, :]
        a = tl.where(lower, tl.dot(qc, tl.trans(kc), input_precision=PREC), 0.0)
        p = tl.dot(doc, tl.trans(vc), input_precision=PREC) + ddc[:, None]
        p = tl.where(lower, p, 0.0)
        dk += tl.dot(tl.trans(p), qc, input_precision=PREC)
        dv += tl.dot(tl.trans(a), doc, input_precision=PREC)
    _put_chunk(dk_ptr + bh * LK * DK, dk, rows, rk, LK, DK)
    _put_chunk(dv_ptr + bh * LK * DV, dv, rows, rv, LK, DV)


def _precision(t: Tensor) -> str:
    """``tl.dot``'s fp32 mode: TF32 only where torch allows it for its own fp32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), else full fp32 ("ieee")."""
    tf32 = t.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def _fwd_states(fk: Tensor, v: Tensor, causal: bool, chunk: int, prec: str
                ) -> tuple[Tensor, Tensor, tuple]:
    """The key/value states (before each chunk, or one) and the kernels' meta arguments."""
    b, g, lk, dk = fk.shape
    dv = v.shape[-1]
    meta = (dk, dv, chunk, padded(dk), padded(dv), causal, prec)
    nt = triton.cdiv(lk, chunk) if causal else 1
    s = fk.new_empty(b * g, nt, meta[3], meta[4], dtype=torch.float32)
    z = fk.new_empty(b * g, nt, meta[3], dtype=torch.float32)
    _states[(b * g,)](fk, v, s, z, lk, nt, *meta)
    return s, z, meta


# The kernels as PyTorch custom ops (see the module docstring): each op has a fake kernel
# (its outputs' shapes and dtypes) and the forward op its autograd formula.


@torch.library.custom_op("attnlab::linear_triton_fwd", mutates_args=())
def linear_fwd_op(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, chunk: int
                  ) -> tuple[Tensor, Tensor]:
    """num (B, H, Lq, Dv) and den (B, H, Lq), float32 (the kernels index contiguous rows)."""
    fq, fk, v = (t.contiguous() for t in (fq, fk, v))
    b, h, lq, _ = fq.shape
    g, lk, dv = fk.shape[1], fk.shape[2], v.shape[-1]
    s, z, meta = _fwd_states(fk, v, causal, chunk, _precision(fq))
    nt = s.shape[1]
    num = fq.new_empty(b, h, lq, dv, dtype=torch.float32)
    den = fq.new_empty(b, h, lq, dtype=torch.float32)
    _outputs[(triton.cdiv(lq, chunk), b * h)](fq, fk, v, s, z, num, den, lq, lk, nt, h, g,
                                              *meta)
    return num, den


@linear_fwd_op.register_fake
def _linear_fwd_fake(fq: Tensor, fk: Tensor, v: Tensor, causal: bool, chunk: int
                     ) -> tuple[Tensor, Tensor]:
    b, h, lq, _ = fq.shape
    return (fq.new_empty(b, h, lq, v.shape[-1], dtype=torch.float32),
            fq.new_empty(b, h, lq, dtype=torch.float32))


@torch.library.custom_op("attnlab::linear_triton_bwd", mutates_args=())
def linear_bwd_op(dnum: Tensor, dden: Tensor, fq: Tensor, fk: Tensor, v: Tensor,
                  causal: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of fq, fk and v (their shapes and dtypes) from those of num and den.
    The states are recomputed, not saved by the forward: one more pass over k and v instead
    of Lk / C float32 (Dk x Dv) tiles held per head."""
    fq, fk, v = (t.contiguous() for t in (fq, fk, v))
    b, h, lq, dk = fq.shape
    g, lk, dv = fk.shape[1], fk.shape[2], v.shape[-1]
    s, z, meta = _fwd_states(fk, v, causal, chunk, _precision(fq))
    nt = s.shape[1]
    dnum, dden = dnum.contiguous(), dden.contiguous()
    ds = fq.new_empty(b * h, nt, meta[3], meta[4], dtype=torch.float32)
    dz = fq.new_empty(b * h, nt, meta[3], dtype=torch.float32)
    _states_back[(b * h,)](fq, dnum, dden, ds, dz, lq, nt, *meta)
    dq = torch.empty_like(fq, dtype=torch.float32)
    _grad_q[(triton.cdiv(lq, chunk), b * h)](fk, v, dnum, dden, s, z, dq, lq, lk, nt, h, g,
                                             *meta)
    dkh = fq.new_empty(b, h, lk, dk, dtype=torch.float32)  # per query head
    dvh = fq.new_empty(b, h, lk, dv, dtype=torch.float32)
    _grad_kv[(triton.cdiv(lk, chunk), b * h)](fq, fk, v, dnum, dden, ds, dz, dkh, dvh, lq,
                                              lk, nt, h, g, *meta)
    dkk = dkh.view(b, g, h // g, lk, dk).sum(2)  # each kv head's group of query heads
    dvv = dvh.view(b, g, h // g, lk, dv).sum(2)
    return dq.to(fq.dtype), dkk.to(fk.dtype), dvv.to(v.dtype)


@linear_bwd_op.register_fake
def _linear_bwd_fake(dnum: Tensor, dden: Tensor, fq: Tensor, fk: Tensor, v: Tensor,
                     causal: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    return fq.new_empty(fq.shape), fk.new_empty(fk.shape), v.new_empty(v.shape)


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    fq, fk, v, causal, chunk = inputs
    ctx.save_for_backward(fq, fk, v)
    ctx.causal, ctx.chunk = causal, chunk


def _linear_grad(ctx: Any, dnum: Tensor | None, dden: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
    fq, fk, v = ctx.saved_tensors
    if dnum is None:  # an output that took no part in the loss
        dnum = fq.new_zeros(*fq.shape[:3], v.shape[-1], dtype=torch.float32)
    if dden is None:
        dden = fq.new_zeros(fq.shape[:3], dtype=torch.float32)
    dq, dk, dv = linear_bwd_op(dnum, dden, fq, fk, v, ctx.causal, ctx.chunk)
    return dq, dk, dv, None, None


linear_fwd_op.register_autograd(_linear_grad, setup_context=_linear_setup)


def linear_sums(fq: Tensor, fk: Tensor, v: Tensor, *, causal: bool, chunk: int
                ) -> tuple[Tensor, Tensor]:
    """(num (B, H, Lq, Dv), den (B, H, Lq)) in fp32 of feature-mapped ``fq`` (B, H, Lq, Dk),
    ``fk`` (B, H_kv, Lk, Dk) and ``v`` (B, H_kv, Lk, Dv), padded keys already zero rows;
    causal needs Lq = Lk. ``chunk``: a power of two >= 16. Differentiable (Triton backward)."""
    fq, fk, v = (t.contiguous() for t in (fq, fk, v))
    return linear_fwd_op(fq, fk, v, bool(causal), int(chunk))
