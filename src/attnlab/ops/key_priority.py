"""Softmax attention over the top-w keys of a query-independent key priority, per tile.

Dynamic Mask Attention ("Trainable Dynamic Mask Sparse Attention") scores every key with a
priority delta_j that does not depend on the query; query i keeps the w visible keys of
highest delta (ties: the later key) and O_i = softmax_j(c q_i.k_j + delta_j) V over them.

Because the priority is the same for every query, the selection needs no (Lq, Lk) matrix:

- without a causal mask every query keeps the same w keys: one attention over w keys;
- causal, the keys a tile of query rows i0 .. i1 may keep lie in P, the top-w keys of the
  prefix every row of the tile sees, plus the tile's own new keys X (a key outside the prefix
  top-w has w better keys in front of every row). Row i sees P and the m_i first keys of X,
  w + m_i candidates, and keeps those whose rank is >= its w-th largest, which is the
  (m_i + 1)-th smallest: the smallest m_i + 1 elements of P and X suffice to find it. P for
  the next tile is the top-w of P and this tile's keys.

So the work is Lq (w + tile) d instead of Lq Lk d. The causal path is one autograd function:
the backward recomputes each tile's probabilities from the saved candidates and adds the
key gradients into one buffer in place, so memory holds one tile of (rows, w + tile) scores
and the candidates' indices, never (Lq, Lk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.core.masks import NO_KEY, ranked_keys
from attnlab.ops.common import default_scale, expand_kv, guarded_op, upcast
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.tiled import row_tiles

ROWS_PER_TILE = 128
INDEX_BITS = (1 << 32) - 1  # a rank's low bits: the key's index (0 for NO_KEY, masked)


def _top(rank: Tensor, w: int) -> Tensor:
    """The w largest ranks (.., w), padded with NO_KEY when there are fewer."""
    n = rank.shape[-1]
    top = rank.topk(min(w, n), dim=-1).values if n else rank
    if top.shape[-1] < w:
        top = torch.nn.functional.pad(top, (0, w - top.shape[-1]), value=NO_KEY)
    return top


def _index(rank: Tensor) -> Tensor:
    return rank & INDEX_BITS


@guarded_op("key_priority_attention")
def key_priority_attention(q: Tensor, k: Tensor, v: Tensor, priority: Tensor, *, window: int,
                           causal: bool = False, mask: Tensor | None = None,
                           scale: float | None = None, rows: int = ROWS_PER_TILE) -> Tensor:
    """O_i = softmax_j(c q_i.k_j + p_j) v_j over the ``window`` visible keys of highest p.

    Args:
        q: (B, H, Lq, D); k, v: (B, H_kv, Lk, D) (GQA when H_kv divides H).
        priority: (B, H_kv, Lk) float, the key priority p, also added to the scores.
        window: w, keys kept per query (ties: the later key); all when w >= the visible keys.
        causal: query i sees keys j <= i + Lk - Lq (queries aligned to the end of the keys).
        mask: key padding, bool broadcastable to (B, 1, 1, Lk), True = real key.
        rows: query rows per tile (causal only).

    Returns (B, H, Lq, D); a row that sees no key is 0. Equals softmax attention with the
    mask of ``attnlab.core.masks.top_keys`` and ``priority`` as bias (tested).
    """
    if window < 1:
        raise ValueError(f"key_priority_attention: window must be >= 1, got {window}")
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if priority.shape != (b, k.shape[1], lk):
        raise ValueError(f"key_priority_attention: priority must be (B, H_kv, Lk) = "
                         f"{(b, k.shape[1], lk)}, got {tuple(priority.shape)}")
    if mask is not None and mask.dim() == 4 and mask.shape[-2] != 1:
        raise ValueError("key_priority_attention: mask must be key padding (B, 1, 1, Lk); "
                         f"got {tuple(mask.shape)}")
    scale = default_scale(q, scale)
    k, v = expand_kv(k, h), expand_kv(v, h)
    priority = expand_kv(priority.unsqueeze(-1), h).squeeze(-1)
    with torch.no_grad():
        real = None if mask is None else mask.reshape(-1, 1, lk).expand(b, h, lk)
        rank = ranked_keys(priority, real)  # (B, H, Lk)
    if not causal:
        chosen = _top(rank, min(window, lk))
        index = _index(chosen).unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        bias = priority.gather(2, _index(chosen)).unsqueeze(-2).to(q.dtype)
        return softmax_attention(q, k.gather(2, index), v.gather(2, index),
                                 mask=(chosen != NO_KEY).unsqueeze(-2), bias=bias, scale=scale)
    tiles = _causal_tiles(rank, lq, window, rows, mask is not None)
    dtype = q.dtype
    q, k, v, priority = (t.contiguous() for t in upcast(q, k, v, priority))
    with torch.autocast(q.device.type, enabled=False):
        out = _CausalKeyPriority.apply(q, k, v, priority, tiles, scale)
    return out.to(dtype)


def _sees_new(i0: int, i1: int, start: int, end: int, offset: int,
              device: torch.device) -> Tensor:
    """Bool (rows, m): row i of i0 .. i1 sees new key j of start .. end when j <= i + offset."""
    rows = torch.arange(i0, i1, device=device) + offset
    return torch.arange(start, end, device=device) <= rows[:, None]


@dataclass
class _Tile:
    """Query rows i0 .. i1; their new keys start .. end (row i sees those <= i + offset);
    the candidates' ranks (B, H, w + m) and each row's threshold (B, H, rows, 1)."""

    i0: int
    i1: int
    start: int
    end: int
    offset: int
    candidates: Tensor
    threshold: Tensor
    may_be_empty: bool  # some row may keep no key (padding, or a row before the keys)

    def keep(self) -> Tensor:
        """Bool (B, H, rows, w + m): the candidates each row keeps."""
        new = _sees_new(self.i0, self.i1, self.start, self.end, self.offset,
                        self.candidates.device)
        w = self.candidates.shape[-1] - new.shape[-1]
        sees = torch.cat([new.new_ones(new.shape[0], w), new], -1)
        c = self.candidates.unsqueeze(-2)
        return (c >= self.threshold) & (c != NO_KEY) & sees


@torch.no_grad()
def _causal_tiles(rank: Tensor, lq: int, w: int, rows: int, padded: bool) -> list[_Tile]:
    lk = rank.shape[-1]
    offset = lk - lq  # query i sees keys j <= i + offset
    hidden = torch.iinfo(torch.int64).max
    prefix = _top(rank[..., :min(max(offset + 1, 0), lk)], w)  # (B, H, w)
    tiles = []
    for i0, i1 in row_tiles(lq, rows):
        start = min(max(i0 + offset + 1, 0), lk)  # the tile's new keys: start .. end
        end = min(max(i1 + offset, 0), lk)
        new = rank[..., start:end]  # (B, H, m)
        sees_new = _sees_new(i0, i1, start, end, offset, rank.device)
        # a row's threshold, the (m_r + 1)-th smallest of its w + m_r candidates, lies among
        # the m + 1 smallest of the prefix and the new keys it sees (m_r of them)
        low = prefix.topk(min(w, new.shape[-1] + 1), dim=-1, largest=False).values
        pool = torch.cat([low.unsqueeze(-2).expand(-1, -1, i1 - i0, -1),
                          new.unsqueeze(-2).masked_fill(~sees_new, hidden)], -1)
        m_r = sees_new.sum(-1).view(1, 1, -1, 1).expand(*pool.shape[:2], -1, 1)
        threshold = pool.sort(dim=-1).values.gather(-1, m_r)
        tiles.append(_Tile(i0, i1, start, end, offset, torch.cat([prefix, new], -1), threshold,
                           padded or i0 + offset < 0))
        prefix = _top(torch.cat([prefix, rank[..., start:min(max(i1 + offset + 1, 0), lk)]],
                                -1), w)
    return tiles


def _probabilities(q: Tensor, k: Tensor, v: Tensor, priority: Tensor, tile: _Tile,
                   scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The tile's softmax over its kept candidates (0 for a row that keeps none), the
    candidates' keys and values (B, H, C, D), and their rows in k viewed as (B H Lk, D)."""
    b, h, c = tile.candidates.shape
    lk, d = k.shape[2], k.shape[3]
    rows = (_index(tile.candidates) + torch.arange(0, b * h * lk, lk, device=k.device).view(
        b, h, 1)).view(-1)  # index_select on rows: several times faster than gather
    k_c = k.view(-1, d).index_select(0, rows).view(b, h, c, d)
    v_c = v.view(-1, v.shape[-1]).index_select(0, rows).view(b, h, c, -1)
    bias = priority.view(-1).index_select(0, rows).view(b * h, 1, c)
    s = torch.baddbmm(bias, q.flatten(0, 1), k_c.flatten(0, 1).mT, alpha=scale).view(
        b, h, q.shape[2], c)
    keep = tile.keep()
    s = s.masked_fill_(~keep, torch.finfo(s.dtype).min)
    p = torch.softmax(s, -1)
    if tile.may_be_empty:
        p = p.mul_(keep.any(-1, keepdim=True))
    return p, k_c, v_c, rows


class _CausalKeyPriority(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, priority, tiles, scale):
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for t in tiles:
            p, _, v_c, _ = _probabilities(q[:, :, t.i0:t.i1], k, v, priority, t, scale)
            out[:, :, t.i0:t.i1] = p @ v_c
        ctx.save_for_backward(q, k, v, priority, out)
        ctx.tiles, ctx.scale = tiles, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, priority, out = ctx.saved_tensors
        scale = ctx.scale
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dpriority = torch.zeros_like(priority)
        rowdot = (dout * out).sum(-1, keepdim=True)
        for t in ctx.tiles:
            q_t, do = q[:, :, t.i0:t.i1], dout[:, :, t.i0:t.i1]
            p, k_c, v_c, rows = _probabilities(q_t, k, v, priority, t, scale)
            # masked candidates point at key 0 and add p = 0 there
            dv.view(-1, dv.shape[-1]).index_add_(0, rows, (p.mT @ do).flatten(0, 2))
            ds = p * (do @ v_c.mT - rowdot[:, :, t.i0:t.i1])
            dq[:, :, t.i0:t.i1] = (ds @ k_c) * scale
            dk.view(-1, dk.shape[-1]).index_add_(0, rows, (ds.mT @ q_t).flatten(0, 2),
                                                 alpha=scale)
            dpriority.view(-1).index_add_(0, rows, ds.sum(-2).flatten())
        return dq, dk, dv, dpriority, None, None
