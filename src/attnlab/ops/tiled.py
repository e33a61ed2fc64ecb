"""Memory-bounded, row-tiled attention for mechanisms with row-local weights.

For ``out = W(S) V`` with scores ``S = c Q K^T + b`` and weights whose row i depends only on row
i of S (sigmoid, softplus, LSSAR, softmax, ...), the output is computed one block of query rows
at a time, and the backward recomputes each block from q, k, v:

    forward:   s = c q_blk k^T + b;  w = W(s);  out_blk = w v
    backward:  dv += w^T do_blk;  g = do_blk v^T;  ds = vjp_W(g);
               dq_blk = c ds k;  dk += c ds^T q_blk

so training never holds more than ``block x Lk`` scores per head: memory grows linearly in L.
A mechanism supplies a :class:`RowMath` (its weights and their vector-Jacobian product); the
engine does the tiling, the matmuls and the masks. Causal blocks only touch the keys they see,
and without a padding mask only the diagonal sub-block is masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor

from attnlab.ops.common import at_least_float32, upcast
from attnlab.ops.dispatch import needs_grad

# At most this many scores per block (B * H * rows * Lk): 32 MB in float32.
TILE_ELEMENTS = 1 << 23
# Rows per block: matmuls over 64-128 query rows ran fastest on CPU (benchmarks/results/).
MAX_ROWS, MIN_ROWS = 128, 16
# On the CPU a tile holds this many scores at most when several heads could share it (1 MiB
# in float32, about half a core's L2 cache): the row math's passes over a tile and the GEMMs
# writing it then stay in cache. Measured on the 2-core CPU, training at L = 4096, causal, 8
# heads: a tile of 1 head x 128 rows against 8 heads x 128 rows, sigmoid 349 vs 452 ms, LSSA
# 511 vs 627 ms, LSSAR 1040 vs 1532 ms (docs/bench.md).
CACHE_TILE_ELEMENTS = 1 << 18


def auto_block_size(batch_heads: int, lk: int) -> int:
    """Query rows per block: ``MAX_ROWS``, fewer when a block would exceed ``TILE_ELEMENTS``."""
    rows = TILE_ELEMENTS // max(1, batch_heads * lk)
    return int(min(MAX_ROWS, max(MIN_ROWS, rows)))


def auto_tiling(batch_heads: int, lk: int, device: torch.device,
                block_size: int | None = None) -> tuple[int, int]:
    """(heads, rows) of a tile of scores. On the CPU, as many heads as fit
    ``CACHE_TILE_ELEMENTS`` (at least one); elsewhere every head at once (a GPU wants few,
    large GEMMs). Rows: ``block_size``, or ``MAX_ROWS`` as long as the tile stays within
    ``TILE_ELEMENTS``."""
    if device.type != "cpu":
        return batch_heads, block_size or auto_block_size(batch_heads, lk)
    rows = block_size or auto_block_size(1, lk)
    # several heads fit only where rows * lk <= 2^17, far inside TILE_ELEMENTS
    return max(1, min(batch_heads, CACHE_TILE_ELEMENTS // max(1, rows * lk))), rows


@dataclass
class BlockVisibility:
    """Which keys ``0 .. kend`` the query rows ``i0 .. i1`` see.

    ``offset``: causal offset (query i sees keys j <= i + offset), or None when not causal.
    ``mask``: (BH or 1, rows or 1, kend) bool from the op-level mask, or None.
    """

    i0: int
    i1: int
    kend: int
    offset: int | None
    mask: Tensor | None

    def _rows(self, device: torch.device) -> Tensor:
        return torch.arange(self.i0, self.i1, device=device).view(1, -1, 1)

    def fill_(self, t: Tensor, value: float) -> Tensor:
        """Set the invisible entries of ``t`` (BH, rows, kend) to ``value``, in place."""
        if self.mask is not None:
            t.masked_fill_(~self.mask, value)
        if self.offset is not None:
            start = max(0, self.i0 + self.offset + 1)  # keys before `start`: seen by every row
            if start < self.kend:
                cols = torch.arange(start, self.kend, device=t.device)
                t[..., start:].masked_fill_(cols > self._rows(t.device) + self.offset, value)
        return t

    def counts(self, like: Tensor) -> Tensor:
        """Visible keys per row, (BH or 1, rows, 1), in the dtype and device of ``like``."""
        if self.mask is None and self.offset is not None:
            return (self._rows(like.device) + self.offset + 1).clamp(0, self.kend).to(like.dtype)
        if self.mask is None:
            return like.new_full((1, 1, 1), float(self.kend))
        return self.fill_(like.new_ones(*self.mask.shape[:-2], self.i1 - self.i0, self.kend),
                          0.0).sum(-1, keepdim=True)


def block_counts(vis: BlockVisibility | None, s: Tensor) -> Tensor:
    """Keys each row of a block of scores ``s`` sees: all ``s.shape[-1]`` without a mask."""
    return vis.counts(s) if vis is not None else s.new_full((1, 1, 1), float(s.shape[-1]))


class RowMath:
    """Row-local attention weights ``w = W(s)`` and their vector-Jacobian product.

    ``scale`` and ``bias`` define the scores ``s = scale * q.k + bias`` (fused into the matmul).
    ``weights`` may overwrite ``s``; ``vjp`` may overwrite ``g``. ``rowdot`` is ``do_i . o_i``
    = sum_j w_ij g_ij, which normalised weights need.
    """

    scale: float = 1.0
    bias: float = 0.0

    def weights(self, s: Tensor, vis: BlockVisibility | None) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def vjp(self, g: Tensor, w: Tensor, aux: Any, vis: BlockVisibility | None,
            rowdot: Tensor) -> Tensor:
        raise NotImplementedError


def keys_seen(i1: int, lq: int, lk: int, causal: bool) -> int:
    """How many leading keys the query rows before ``i1`` may see: all ``lk``, or, causal
    with the queries aligned to the end of the keys, ``min(lk, i1 + lk - lq)`` (<= 0: none)."""
    return min(lk, i1 + lk - lq) if causal else lk


def _blocks(lq: int, lk: int, causal: bool, mask3: Tensor | None, size: int):
    offset = lk - lq if causal else None
    for i0 in range(0, lq, size):
        i1 = min(lq, i0 + size)
        kend = keys_seen(i1, lq, lk, causal)
        if kend <= 0:
            yield i0, i1, None  # rows that see no key at all
            continue
        m = None
        if mask3 is not None:
            m = (mask3 if mask3.shape[1] == 1 else mask3[:, i0:i1])[..., :kend]
        vis = BlockVisibility(i0, i1, kend, offset, m)
        yield i0, i1, (vis if (causal or m is not None) else None, kend)


def _score_operands(math: RowMath, q3: Tensor, k3: Tensor) -> tuple[Tensor, Tensor]:
    """(q', k') with q' k'^T = scale q k^T + bias: q scaled once, a nonzero bias as one more
    column, [scale q, bias] . [k, 1]. Each tile's scores are then one GEMM; a baddbmm with
    the broadcast bias first writes the bias over the whole tile (measured on the 2-core
    CPU: 3.6 against 2.2 ms for a (8, 128, 4096) tile)."""
    qs = q3 if math.scale == 1 else q3 * math.scale
    if math.bias == 0:
        return qs, k3
    return (torch.cat([qs, qs.new_full((*qs.shape[:-1], 1), math.bias)], -1),
            torch.cat([k3, k3.new_ones(*k3.shape[:-1], 1)], -1))


def _scores(qs_blk: Tensor, ks: Tensor) -> Tensor:
    """Scores of a block from the score operands, in float32 at least (a low-precision
    matmul, bf16 q and k, is upcast after)."""
    return at_least_float32(torch.bmm(qs_blk, ks.mT))


def _mm(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """``a @ b`` with both in ``like``'s dtype (bf16 inputs: a bf16 GEMM, float32
    accumulation inside), returned in float32 at least."""
    return at_least_float32(torch.bmm(a.to(like.dtype), b.to(like.dtype)))


def _add_mm(acc: Tensor, a: Tensor, b: Tensor, like: Tensor) -> None:
    """``acc += a @ b`` (the GEMM as in ``_mm``); in place when nothing is low precision."""
    if like.dtype == acc.dtype:
        acc.baddbmm_(a, b)
    else:
        acc += _mm(a, b, like)


def _tiles(bh: int, tiling: tuple[int, int], lq: int, lk: int, causal: bool,
           mask3: Tensor | None):
    """(h0, h1, i0, i1, blk) of each tile of ``tiling`` = (heads, rows) that sees a key, head
    groups outermost (a group's keys and values stay in cache over its blocks of rows); blk
    as in ``_blocks``."""
    heads, size = tiling
    for h0 in range(0, bh, heads):
        h1 = min(bh, h0 + heads)
        m = mask3 if mask3 is None or mask3.shape[0] == 1 else mask3[h0:h1]
        for i0, i1, blk in _blocks(lq, lk, causal, m, size):
            if blk is not None:
                yield h0, h1, i0, i1, blk


class _RowTiled(torch.autograd.Function):
    """q3, k3, v3 in float32 (or float64), or in bf16/fp16 for low-precision GEMMs: the row
    math, the output and the gradients' accumulation stay in float32."""

    @staticmethod
    def forward(ctx, q3, k3, v3, math, causal, mask3, tiling):
        bh, lq, lk = q3.shape[0], q3.shape[1], k3.shape[1]
        out = q3.new_zeros(bh, lq, v3.shape[-1],
                           dtype=torch.promote_types(q3.dtype, torch.float32))
        qs, ks = _score_operands(math, q3, k3)
        for h0, h1, i0, i1, (vis, kend) in _tiles(bh, tiling, lq, lk, causal, mask3):
            w, _ = math.weights(_scores(qs[h0:h1, i0:i1], ks[h0:h1, :kend]), vis)
            out[h0:h1, i0:i1] = _mm(w, v3[h0:h1, :kend], v3)
        ctx.save_for_backward(q3, k3, v3, mask3, out)
        ctx.math, ctx.causal, ctx.tiling = math, causal, tiling
        return out

    @staticmethod
    def backward(ctx, dout):
        q3, k3, v3, mask3, out = ctx.saved_tensors
        math = ctx.math
        dout = dout.contiguous()
        acc = {t: torch.promote_types(t.dtype, torch.float32) for t in (q3, k3, v3)}
        dq = torch.zeros_like(q3, dtype=acc[q3])
        # dk and dv accumulate transposed, (BH, D, Lk): a block adds to their first kend
        # columns, and that GEMM ran ~25% faster than into the first kend rows of (BH, Lk, D)
        dk_t, dv_t = (t.new_zeros(t.shape[0], t.shape[2], t.shape[1], dtype=acc[t])
                      for t in (k3, v3))
        rowdot = (dout * out).sum(-1, keepdim=True)
        low = dout.to(q3.dtype)  # dO for the GEMMs
        qs, ks = _score_operands(math, q3, k3)
        bh, lq, lk = q3.shape[0], q3.shape[1], k3.shape[1]
        for h0, h1, i0, i1, (vis, kend) in _tiles(bh, ctx.tiling, lq, lk, ctx.causal, mask3):
            q_blk, do_blk = q3[h0:h1, i0:i1], low[h0:h1, i0:i1]
            k_seen, v_seen = k3[h0:h1, :kend], v3[h0:h1, :kend]
            w, aux = math.weights(_scores(qs[h0:h1, i0:i1], ks[h0:h1, :kend]), vis)
            _add_mm(dv_t[h0:h1, :, :kend], do_blk.mT, w, v3)
            g = _mm(do_blk, v_seen.mT, v3)
            ds = math.vjp(g, w, aux, vis, rowdot[h0:h1, i0:i1])
            dq[h0:h1, i0:i1] = _mm(ds, k_seen, k3)
            _add_mm(dk_t[h0:h1, :, :kend], q_blk.mT, ds, q3)
        dq.mul_(math.scale)
        dk_t.mul_(math.scale)
        return (dq.to(q3.dtype), dk_t.mT.to(k3.dtype), dv_t.mT.to(v3.dtype),
                None, None, None, None)


def _row_tiled_without_autocast(*args) -> Tensor:
    """The engine computes in its inputs' dtype (``begin`` cast them to autocast's): autocast
    would turn its matmuls into bf16 next to float32 buffers."""
    with torch.autocast(args[0].device.type, enabled=False):
        return _RowTiled.apply(*args)


def row_tiled(math: RowMath, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
              mask: Tensor | None, block_size: int | None = None) -> Tensor:
    """``W(scale * q k^T + bias) @ v`` over blocks of query rows, forward and backward.

    ``q`` (B, H, Lq, D), ``k`` and ``v`` (B, H, Lk, D) with heads already expanded; ``mask``
    bool, broadcastable to (B, H, Lq, Lk); causal aligns queries to the end of the keys.
    Low-precision inputs (bf16, fp16) go through GEMMs in their dtype on a GPU (float32
    accumulation inside); on the CPU through float32 GEMMs on float32 copies: there the
    conversions of every cache-sized tile to and from bf16 cost more than the faster bf16
    GEMMs saved (sigmoid training at 4k, bf16: 468 vs 375 ms). The scores, the row math and
    the accumulation of the output and the gradients are float32.
    """
    b, h, lq, _ = q.shape
    lk, dtype = k.shape[2], q.dtype
    if q.device.type == "cpu":
        q, k, v = upcast(q, k, v)
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v))
    mask3 = None
    if mask is not None:
        full = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        m = mask.reshape(full).expand(b, h, full[2], lk)
        mask3 = m.reshape(b * h, full[2], lk)
    tiling = auto_tiling(b * h, lk, q.device, block_size)
    out = _row_tiled_without_autocast(q3, k3, v3, math, causal, mask3, tiling)
    return out.reshape(b, h, lq, -1).to(dtype)


def recomputed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; when a gradient will be needed, through activation checkpointing, so
    that autograd keeps only ``fn``'s inputs and the backward recomputes the rest (one tile's
    scores at a time instead of all of them)."""
    if needs_grad(*(a for a in args if isinstance(a, Tensor))):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def row_tiles(lq: int, rows: int):
    """(i0, i1) of consecutive tiles of ``rows`` query rows covering ``0 .. lq``."""
    for i0 in range(0, lq, rows):
        yield i0, min(lq, i0 + rows)
