"""Sparsifiner attention per tile of query rows: selection, attention and distillation, forward
and backward, in memory linear in the length.

Sparsifiner ("Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers")
scores every (query, key) pair with a low-rank connectivity C = a c^T / sqrt(r) per head
(a: (Lq, r), c: (Lk, r)); query i keeps its k visible keys of highest C (``top_keys``: ties go
to the later key) and

    O_i = softmax_j(s q_i.k_j over the kept keys) V.

In training the predictor learns by distillation: for each row that sees a key,
KL_i = sum_j D_ij (log D_ij - log Q_ij), with D = softmax over the visible keys of s q_i.k_j
(no gradient) and Q = softmax over the visible keys of C.

Unlike DMA's key priority, C depends on the query, so each row's selection needs its whole
row of C: the op computes it per tile of (heads, rows) against the keys the tile sees. It is
one autograd function. The forward keeps, besides its inputs and output, one int64 per query
row: the rank threshold of its selection (the quickselect of ``top_keys``). The backward
recomputes each tile's C, its ranks, the kept keys from the saved thresholds and the
softmaxes, and adds into gradient buffers allocated once:

    dv += P^T dO;  dS = P (dO V^T - rowdot);  dq = s dS K;  dk += s dS^T q
    dC = log-softmax backward of -g D (0 where invisible);  da = dC c / sqrt(r);
    dc += dC^T a / sqrt(r)

Nothing of a tile outlives it: its (rows, Lk) temporaries are freed before the next tile
starts. The earlier form, activation checkpointing per tile around softmax attention (every
head in a tile, and each tile's gradients of the whole k, v and c as separate pieces), held
a little more live memory but left glibc's heap far larger: a training step at L = 8192 (dim
256, 4 heads) peaked at 1.9-2.4 GiB of RSS, and at 471 MiB with glibc's mmap threshold at
64 KiB (``MALLOC_MMAP_THRESHOLD_=65536``: every large block goes back to the system when
freed). This op peaks at 427 MiB with the default allocator, 364 MiB with that threshold
(benchmarks/results/sparsifiner-memory-cpu.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from attnlab.core.masks import causal_visibility, ranked_keys, window_threshold
from attnlab.ops.common import default_scale, expand_kv, upcast
from attnlab.ops.tiled import (
    MAX_ROWS,
    MIN_ROWS,
    TILE_ELEMENTS,
    auto_tiling,
    keys_seen,
    row_tiles,
)

# Scores of a tile (heads x rows x keys) on the CPU. At L = 8192 a tile of one head's last
# rows is 64 x 8192: 2 MiB of float32 scores, and 4 MiB for each int64 rank tensor of the
# selection (two or three at once). Training at L = 8192 on the 2-core CPU, one thread, peak
# RSS (as benchmarks/sparsifiner_memory.py measures it), one head and a fixed number of rows
# per tile: 2^20 scores 449 MiB, 2^19 397 MiB, 2^18 383 MiB, the same time within noise.
# A GPU takes tiles of TILE_ELEMENTS (ops.tiled) over every head.
TILE_SCORES = 1 << 19
# Rows of a tile that sees few keys (causal: the early rows) may go up to this: fewer, larger
# tiles in the same memory (72 instead of 128 tiles per head at L = 8192), and every tile
# pays the same fixed costs (some 40 ops, each a parallel region).
MAX_TILE_ROWS = 4 * MAX_ROWS
# The reference fills the invisible connectivity with this before its log-softmax.
HIDDEN_CONNECTIVITY = -1e9


@dataclass(frozen=True)
class _Plan:
    """What every tile needs besides the tensors."""

    count: int  # keys kept per query
    causal: bool
    scale: float  # of the attention scores
    conn_div: float  # C = a c^T / conn_div (sqrt(r) by default)
    distill: bool
    heads: int  # heads per tile
    rows: int | None  # rows per tile; None: as many as fit ``budget``
    budget: int  # scores per tile
    may_be_empty: bool  # some row may see no key (padding, or causal with Lq > Lk)


@dataclass(frozen=True)
class _Tile:
    """Heads h0 .. h1 (of B H) and query rows i0 .. i1, which see keys 0 .. kend at most."""

    h0: int
    h1: int
    i0: int
    i1: int
    kend: int

    @property
    def heads(self) -> slice:
        return slice(self.h0, self.h1)

    @property
    def rows(self) -> slice:
        return slice(self.i0, self.i1)

    @property
    def keys(self) -> slice:
        return slice(0, self.kend)


@dataclass
class _Operands:
    """The op's tensors, (B H, L, .): q, k, v, the connectivity's factors a and c, the key
    padding (B H, 1, Lk) or None, and each row's threshold rank of the selection (B H, Lq, 1)
    int64, found by the forward and read by the backward (no second quickselect)."""

    q: Tensor
    k: Tensor
    v: Tensor
    a: Tensor
    c: Tensor
    mask: Tensor | None
    thresholds: Tensor

    @property
    def lq(self) -> int:
        return self.q.shape[1]

    @property
    def lk(self) -> int:
        return self.k.shape[1]

    def tiles(self, plan: _Plan) -> Iterator[_Tile]:
        """The tiles that see a key, head groups outermost (their keys stay in cache)."""
        bh, lq, lk = self.q.shape[0], self.lq, self.lk
        for h0 in range(0, bh, plan.heads):
            for i0, i1 in _row_ranges(lq, lk, plan):
                kend = keys_seen(i1, lq, lk, plan.causal)
                if kend > 0:  # rows that see no key keep their zero output
                    yield _Tile(h0, min(bh, h0 + plan.heads), i0, i1, kend)


def _row_ranges(lq: int, lk: int, plan: _Plan) -> Iterator[tuple[int, int]]:
    """(i0, i1) of the tiles of query rows: ``plan.rows`` each, or by memory: as many rows
    (MIN_ROWS .. MAX_TILE_ROWS) as keep heads x rows x the keys they see within the budget,
    so that causal tiles of rows that see few keys are taller."""
    if plan.rows is not None:
        yield from row_tiles(lq, plan.rows)
        return
    i0 = 0
    while i0 < lq:
        widest = keys_seen(min(lq, i0 + MAX_TILE_ROWS), lq, lk, plan.causal)
        rows = plan.budget // max(1, plan.heads * widest)
        i1 = min(lq, i0 + max(MIN_ROWS, min(MAX_TILE_ROWS, rows)))
        yield i0, i1
        i0 = i1


def _visible(t: _Tile, ops: _Operands, causal: bool) -> Tensor:
    """Bool (heads, rows, kend): the keys each row of the tile may see (causal, padding)."""
    vis = None
    if causal:
        vis = causal_visibility(t.i1 - t.i0, ops.lk, ops.q.device, q_start=t.i0,
                                q_total=ops.lq, k_end=t.kend).unsqueeze(0)
    if ops.mask is not None:
        m = ops.mask[t.heads, :, t.keys]
        vis = m if vis is None else vis & m
    if vis is None:
        vis = torch.ones(1, 1, t.kend, dtype=torch.bool, device=ops.q.device)
    return vis.expand(t.h1 - t.h0, t.i1 - t.i0, t.kend)


def _kept(conn: Tensor, vis: Tensor, count: int, threshold: Tensor, known: bool) -> Tensor:
    """``top_keys(conn, vis, count)``: the visible keys whose rank (``ranked_keys``) is at
    least the row's count-th largest; that threshold (rows, 1) is found by quickselect into
    ``threshold`` unless ``known``."""
    if count >= conn.shape[-1]:
        return vis
    rank = ranked_keys(conn, vis)
    if not known:
        threshold.copy_(window_threshold(rank, count))
    return torch.ge(rank, threshold).logical_and_(vis)


def _softmax(filled: Tensor, seen: Tensor | None) -> Tensor:
    """Softmax of scores whose hidden entries are filled with a very negative number; rows
    that see nothing (``seen`` False) are 0. ``seen`` None: every row sees a key."""
    p = torch.softmax(filled, dim=-1)
    return p if seen is None else p.mul_(seen)


class _TileMath:
    """One tile's slices of the op's (B H, L, .) tensors, its connectivity C (in a's dtype:
    the selection is made from these values), visibility, kept keys and scores s q k^T. Each
    pass (forward, backward) computes them once; the weights below overwrite C and the
    scores in place, in the order the passes use them."""

    def __init__(self, t: _Tile, ops: _Operands, plan: _Plan, backward: bool):
        self.q, self.a = ops.q[t.heads, t.rows], ops.a[t.heads, t.rows]
        self.k, self.v = ops.k[t.heads, t.keys], ops.v[t.heads, t.keys]
        self.c = ops.c[t.heads, t.keys]
        self.conn = torch.bmm(self.a, self.c.mT).div_(plan.conn_div)
        self.conn_dtype = self.conn.dtype
        self.vis = _visible(t, ops, plan.causal)
        self.keep = _kept(self.conn, self.vis, plan.count,
                          ops.thresholds[t.heads, t.rows], known=backward)
        self.s = torch.bmm(self.q, self.k.mT).mul_(plan.scale)
        self.seen = self.vis.any(-1, keepdim=True) if plan.may_be_empty else None

    @cached_property
    def hidden(self) -> Tensor:
        """The invisible keys (only the distillation needs them)."""
        return ~self.vis

    def attention_weights(self) -> Tensor:
        """P: softmax of the scores over the kept keys (a new tensor)."""
        return _softmax(self.s.masked_fill(~self.keep, torch.finfo(self.s.dtype).min),
                        self.seen)

    def dense_weights(self) -> Tensor:
        """D: softmax of the scores over the visible keys (overwrites the scores)."""
        return _softmax(self.s.masked_fill_(self.hidden, torch.finfo(self.s.dtype).min),
                        self.seen)

    def log_predicted(self) -> Tensor:
        """log Q: log-softmax of C over the visible keys, in float32 at least as the
        reference (overwrites C unless it is narrower than float32)."""
        wide = self.conn.to(torch.promote_types(self.conn.dtype, torch.float32))
        return torch.log_softmax(wide.masked_fill_(self.hidden, HIDDEN_CONNECTIVITY), dim=-1)

    def kl(self) -> tuple[Tensor, Tensor | int]:
        """KL(D || Q) summed over the rows that see a key, and their number."""
        d = self.dense_weights()
        per_row = d.clamp_min(1e-12).log_().sub_(self.log_predicted()).mul_(d).sum(-1)
        if self.seen is None:
            return per_row.sum(), per_row.numel()
        seen = self.seen.squeeze(-1)
        return (per_row * seen).sum(), seen.sum()

    def distillation_grad(self, g: Tensor, conn_div: float) -> Tensor:
        """dKL/dC times ``g`` (the KL sum's gradient), through C's 1/conn_div: the
        reference's chain of backward kernels step by step (its log-softmax in float32 at
        least included), so that float64 results agree to float64 rounding."""
        log_q = self.log_predicted()
        g_rows = g if self.seen is None else g * self.seen
        g_log_q = self.dense_weights().mul_(g_rows).neg_().to(log_q.dtype)
        d_conn = torch.ops.aten._log_softmax_backward_data(g_log_q, log_q, -1, log_q.dtype)
        return d_conn.masked_fill_(self.hidden, 0).to(self.conn_dtype).div_(conn_div)


class _SparsifinerTiles(torch.autograd.Function):
    """(out, KL summed over the rows that see a key, their number) from (B H, L, .) inputs."""

    @staticmethod
    def forward(ctx, q, k, v, a, c, mask, plan):
        ops = _Operands(q, k, v, a, c, mask,
                        torch.zeros(*q.shape[:2], 1, dtype=torch.long, device=q.device))
        out = q.new_zeros(*q.shape[:2], v.shape[-1])
        kl, rows = q.new_zeros(()), torch.zeros((), dtype=torch.long, device=q.device)
        for t in ops.tiles(plan):
            m = _TileMath(t, ops, plan, backward=False)
            out[t.heads, t.rows] = torch.bmm(m.attention_weights(), m.v)
            if plan.distill:
                kl_t, rows_t = m.kl()
                kl += kl_t
                rows += rows_t
        ctx.save_for_backward(q, k, v, a, c, mask, ops.thresholds, out)
        ctx.plan = plan
        ctx.mark_non_differentiable(rows)
        ctx.set_materialize_grads(False)
        return out, kl, rows

    @staticmethod
    def backward(ctx, dout, dkl, _):
        *tensors, out = ctx.saved_tensors
        ops, plan = _Operands(*tensors), ctx.plan
        distill = plan.distill and dkl is not None
        if dout is None and not distill:
            return None, None, None, None, None, None, None
        grads = _Grads(ops, distill)
        rowdot = None if dout is None else (dout * out).sum(-1, keepdim=True)
        for t in ops.tiles(plan):
            m = _TileMath(t, ops, plan, backward=True)
            if dout is not None:
                assert rowdot is not None  # made with dout
                grads.attention(t, m, m.attention_weights(), dout[t.heads, t.rows],
                                rowdot[t.heads, t.rows], plan.scale)
            if distill:
                grads.connectivity(t, m, m.distillation_grad(dkl, plan.conn_div))
        return (*grads.result(ops), None, None)


class _Grads:
    """Gradient buffers of q, k, v (when dO is given) and of a, c (when distilling), in
    float32 at least, filled tile by tile."""

    def __init__(self, ops: _Operands, distill: bool):
        self.dq, self.dk, self.dv = (torch.zeros_like(t) for t in (ops.q, ops.k, ops.v))
        wide = torch.promote_types(ops.a.dtype, torch.float32)
        self.da = torch.zeros_like(ops.a, dtype=wide) if distill else None
        self.dc = torch.zeros_like(ops.c, dtype=wide) if distill else None
        self.used_attention = False

    def attention(self, t: _Tile, x: _TileMath, p: Tensor, do: Tensor, rowdot: Tensor,
                  scale: float) -> None:
        """Softmax attention's backward over the tile's kept keys (``p`` their weights)."""
        self.used_attention = True
        self.dv[t.heads, t.keys] += torch.bmm(p.mT, do)
        ds = p.mul_(torch.bmm(do, x.v.mT).sub_(rowdot))  # p is not needed after this
        self.dq[t.heads, t.rows] = torch.bmm(ds, x.k).mul_(scale)
        self.dk[t.heads, t.keys] += torch.bmm(ds.mT, x.q).mul_(scale)

    def connectivity(self, t: _Tile, x: _TileMath, d_conn: Tensor) -> None:
        """C = a c^T / sqrt(r)'s backward (``d_conn`` already through the 1/sqrt(r))."""
        assert self.da is not None and self.dc is not None  # made when distilling
        self.da[t.heads, t.rows] = torch.bmm(d_conn, x.c)
        self.dc[t.heads, t.keys] += torch.bmm(d_conn.mT, x.a)

    def result(self, ops: _Operands) -> tuple[Tensor | None, ...]:
        """The gradients of q, k, v, a, c (None where none flowed), in their dtypes."""
        att = (self.dq, self.dk, self.dv) if self.used_attention else (None, None, None)
        if self.da is None:
            return (*att, None, None)
        assert self.dc is not None  # made with da
        return (*att, self.da.to(ops.a.dtype), self.dc.to(ops.c.dtype))


def _plan(q: Tensor, lk: int, conn_div: float, *, keep: int, causal: bool, masked: bool,
          scale: float | None, distill: bool, rows: int | None) -> _Plan:
    """Tiles: on the CPU ``TILE_SCORES`` scores, one head each unless several fit the cache
    (``auto_tiling``); elsewhere ``TILE_ELEMENTS`` over every head."""
    b, h, lq = q.shape[:3]
    base_rows = rows or max(MIN_ROWS, min(MAX_ROWS, TILE_SCORES // max(1, lk)))
    heads = auto_tiling(b * h, lk, q.device, base_rows)[0]
    return _Plan(keep, causal, default_scale(q, scale), conn_div, distill, heads, rows,
                 TILE_SCORES if q.device.type == "cpu" else TILE_ELEMENTS,
                 may_be_empty=masked or (causal and lq > lk))


def _check(q: Tensor, k: Tensor, a: Tensor, c: Tensor, mask: Tensor | None, keep: int) -> None:
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if keep < 1:
        raise ValueError(f"sparsifiner_attention: keep must be >= 1 key, got {keep}")
    r = a.shape[-1]
    if a.shape != (b, h, lq, r) or c.shape != (b, h, lk, r):
        raise ValueError(f"sparsifiner_attention: a must be (B, H, Lq, r) = {(b, h, lq, r)} "
                         f"and c (B, H, Lk, r) = {(b, h, lk, r)}, got {tuple(a.shape)} and "
                         f"{tuple(c.shape)}")
    if mask is not None and (mask.dim() != 4 or mask.shape[1:3] != (1, 1)):
        raise ValueError("sparsifiner_attention: mask must be key padding (B, 1, 1, Lk); "
                         f"got {tuple(mask.shape)}")


def sparsifiner_attention(q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, *, keep: int,
                          causal: bool = False, mask: Tensor | None = None,
                          scale: float | None = None, distill: bool = False,
                          rows: int | None = None,
                          conn_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax attention over each query's ``keep`` visible keys of highest C = a c^T / sqrt(r).

    Args:
        q: (B, H, Lq, D); k, v: (B, H_kv, Lk, D) (GQA when H_kv divides H).
        a: (B, H, Lq, r), c: (B, H, Lk, r): the connectivity's factors (C in their dtype).
        keep: keys kept per query (ties: the later key); all visible ones when fewer.
        causal: query i sees keys j <= i + Lk - Lq. mask: key padding (B, 1, 1, Lk), True =
            real key.
        scale: of the attention scores, default 1/sqrt(D).
        distill: also return the distillation KL(D || Q) summed over the rows that see a
            key (differentiable in a and c only), and their number; else both are 0.
        rows: query rows per tile; default: by memory (``TILE_SCORES``, ``auto_tiling``).
        conn_scale: None: C = a c^T / sqrt(r); 1: C = a c^T (Sparsifiner's basis predictor:
            a its kept basis coefficients, c the thresholded basis).

    Returns (out (B, H, Lq, D) in q's dtype, KL sum, rows). Equals softmax attention with
    the mask of ``top_keys`` over the (Lq, Lk) connectivity, and the dense KL (tested).
    """
    _check(q, k, a, c, mask, keep)
    b, h, lq, _ = q.shape
    lk, dtype = k.shape[2], q.dtype
    q, k, v = upcast(q, expand_kv(k, h), expand_kv(v, h))
    q3, k3, v3 = (t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v))
    r = a.shape[-1]
    a3, c3 = a.reshape(b * h, lq, r), c.reshape(b * h, lk, r)
    mask3 = None
    if mask is not None:
        mask3 = mask.reshape(-1, 1, lk).expand(b, h, lk).reshape(b * h, 1, lk)
    conn_div = math.sqrt(r) if conn_scale is None else 1.0 / conn_scale
    plan = _plan(q, lk, conn_div, keep=keep, causal=causal, masked=mask is not None, scale=scale,
                 distill=distill, rows=rows)
    with torch.autocast(q.device.type, enabled=False):
        out, kl, seen = _SparsifinerTiles.apply(q3, k3, v3, a3, c3, mask3, plan)
    return out.reshape(b, h, lq, v.shape[-1]).to(dtype), kl, seen
