"""LongHeads chunk selection and attention within the selected chunks.

"LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (Lu et al., 2024),
as its official code (LuLuLuyi/LongHeads, modeling_longheads/modeling_llama.py) computes it:
the keys are cut into chunks of w. Each complete chunk c gets a key: its tokens attend to
each other (full softmax inside the chunk, scale d^-1/2, q and k rotated by their offset in
the chunk when RoPE is on), the mean of those outputs is the chunk's value summary vbar_c,
and the chunk key is that summary's attention over the chunk's keys,

    kbar_c = softmax(vbar_c . K_c^T / sqrt(d)) K_c.

Head h scores the chunks with q_i . kbar_c (q un-rotated); a query in chunk c keeps chunk 0,
chunk c - 1, its own chunk c and the best-scoring chunks among 1 .. c - 2, ``budget`` chunks
in all, and attends causally inside them. A query whose context has at most ``budget``
chunks keeps them all (plain causal attention, as the official's first
``begin_selective_length`` = budget * w tokens). Positions are re-indexed so that the
selected chunks sit next to each other: key j in the r-th selected chunk is at r w + (j mod
w), the query in its local chunk likewise, so every head works at in-distribution distances
(< budget * w). With RoPE a query is rotated to r_i w + (i mod w) and key j, for each rank r
in [0, budget) it can take, to r w + (j mod w): one score matrix per rank, the one of the
key's rank used (the official rotates the laid-out keys; rotating by the distance instead is
the same function but rounds float32 angles otherwise, 3-5e-8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.ops.common import at_least_float32, expand_kv, tracing, upcast
from attnlab.ops.softmax import softmax_weights
from attnlab.ops.tiled import auto_block_size, recomputed, row_tiles

FORCED = 3  # chunk 0, the previous chunk and the query's own chunk


def chunk_keys(key_queries: Tensor, k: Tensor, v: Tensor, *, chunk_size: int,
               key_mask: Tensor | None = None, rotate: Callable | None = None) -> Tensor:
    """The attention-pooled key kbar_c (B, H, C, D) of each of the C = Lk // w complete
    chunks; ``key_queries`` (B, H, Lk, D) are the queries of the key tokens, k and v have
    kv heads (expanded here). Padded tokens are zeros inside their chunk, as the official
    code zeroes them. No gradient: the chunks only select (a discrete choice)."""
    h, w = key_queries.shape[1], chunk_size
    with torch.no_grad():
        kq, k, v = upcast(key_queries.detach(), expand_kv(k.detach(), h),
                          expand_kv(v.detach(), h))
        b, _, lk, d = kq.shape
        n = lk // w
        if key_mask is not None:
            real = key_mask[:, None, :, None].to(kq.dtype)
            kq, k, v = kq * real, k * real, v * real
        if rotate is not None:
            offsets = torch.arange(lk, device=kq.device) % w
            kq, k = rotate(kq, offsets), rotate(k, offsets)
        kq, k, v = (t[:, :, :n * w].reshape(b, h, n, w, d) for t in (kq, k, v))
        inside = torch.softmax(kq @ k.transpose(-1, -2) * d ** -0.5, -1) @ v
        summary = inside.mean(-2, keepdim=True)  # (B, H, C, 1, D)
        pooled = torch.softmax(summary @ k.transpose(-1, -2) * d ** -0.5, -1) @ k
        return pooled.squeeze(-2)


def select_chunks(q: Tensor, keys: Tensor, positions: Tensor, *, chunk_size: int,
                  budget: int, length: int) -> Tensor:
    """Bool (B, H, Lq, C): the chunks of ``length`` keys (C = ceil(length / w)) each query
    (absolute ``positions``) keeps; ``keys`` (B, H, C_full, D) the chunk keys
    (``chunk_keys``) of the complete chunks, at least those before each query's previous
    chunk."""
    b, h, lq, _ = q.shape
    n_chunks = -(-length // chunk_size)
    local = (positions // chunk_size)[:, None]  # (Lq, 1)
    c = torch.arange(n_chunks, device=q.device)[None, :]
    selected = ((c == 0) | (c == local) | (c == local - 1)).expand(b, h, lq, n_chunks).clone()
    extra = min(budget - FORCED, keys.shape[2])
    if extra > 0:
        scores = at_least_float32(q) @ keys.to(at_least_float32(q).dtype).transpose(-1, -2)
        candidate = (c[:, :keys.shape[2]] > 0) & (c[:, :keys.shape[2]] < local - 1)
        masked = scores.masked_fill(~candidate, float("-inf"))
        top = masked.topk(extra, dim=-1).indices
        chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, top, True)
        selected[..., :keys.shape[2]] |= chosen & candidate
    return selected


def longheads_weights(q: Tensor, k: Tensor, positions: Tensor, *, keys: Tensor, chunk_size: int,
                      budget: int, key_mask: Tensor | None = None,
                      rotate: Callable | None = None, scale: float | None = None) -> Tensor:
    """Attention weights (B, H, Lq, Lk) of LongHeads; ``keys`` the chunk keys
    (``chunk_keys``), ``rotate(x, positions)`` RoPE or None. q and k are not rotated yet.
    Rows with no visible key are 0."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    selected = select_chunks(q, keys[:, :, :lk // chunk_size], positions,
                             chunk_size=chunk_size, budget=budget, length=lk)
    chunk_of_key = torch.arange(lk, device=q.device) // chunk_size
    vis = selected[..., chunk_of_key]  # (B, H, Lq, Lk)
    vis = vis & (torch.arange(lk, device=q.device)[None, :] <= positions[:, None])  # causal
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, :]
    k = expand_kv(k, h)
    if rotate is None:
        return softmax_weights(q, k, mask=vis, scale=scale)
    rank = selected.long().cumsum(-1) - 1  # rank of each chunk among the selected ones
    local = positions // chunk_size
    query_rank = rank.gather(-1, local.view(1, 1, lq, 1).expand(b, h, lq, 1))
    key_rank = rank.clamp(0, budget - 1)[..., chunk_of_key]  # (B, H, Lq, Lk)
    offset_q, offset_k = positions % chunk_size, torch.arange(lk, device=q.device) % chunk_size
    # every query and key at its re-indexed position r w + offset, r its chunk's rank: one
    # rotation (and one score matrix) per rank, as the official rotates the laid-out keys
    q_at = torch.stack([at_least_float32(rotate(q, r * chunk_size + offset_q))
                        for r in range(budget)])
    q_at = q_at.gather(0, query_rank.unsqueeze(0).expand(1, b, h, lq, d)).squeeze(0)
    scores = torch.stack([q_at @ at_least_float32(rotate(k, r * chunk_size + offset_k))
                          .transpose(-1, -2) for r in range(budget)])
    s = scores.gather(0, key_rank.unsqueeze(0)).squeeze(0) * scale
    s = s.masked_fill(~vis, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) * vis.any(-1, keepdim=True)


def longheads_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, *, keys: Tensor,
                        chunk_size: int, budget: int, key_mask: Tensor | None = None,
                        rotate: Callable | None = None, scale: float | None = None,
                        rows: int | None = None) -> Tensor:
    """``longheads_weights(..) @ v`` one tile of query rows at a time, each tile recomputed
    in the backward, so memory holds one tile's (rows, Lk) weights, never (Lq, Lk).

    A tile only reads the keys up to its last query (causal); chunks before a query's own
    chunk are complete there, so its selection is the one over all keys.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    passes = budget if rotate is not None else 1  # RoPE scores one matrix per rank
    rows = rows or auto_block_size(b * h * passes, lk)
    traced = tracing()
    last = 0 if traced or not lq else positions.max().item()  # traced: no host read
    if last >= lk:
        raise ValueError(f"longheads: a query at position {last} needs keys up to it, "
                         f"got {lk} keys")

    def tile(q_t: Tensor, k_t: Tensor, v_t: Tensor, pos_t: Tensor, mask_t: Tensor | None
             ) -> Tensor:
        w = longheads_weights(q_t, k_t, pos_t, keys=keys, chunk_size=chunk_size,
                              budget=budget, key_mask=mask_t, rotate=rotate, scale=scale)
        return w.to(v_t.dtype) @ expand_kv(v_t, h)

    outs = []
    for i0, i1 in row_tiles(lq, rows):
        # the keys up to the tile's last query; traced, where that position is no Python
        # number, all keys (the causal selection masks the later ones: the same weights)
        kend = lk if traced else int(positions[i0:i1].max()) + 1
        mask_t = None if key_mask is None else key_mask[:, :kend]
        outs.append(recomputed(tile, q[:, :, i0:i1], k[:, :, :kend], v[:, :, :kend],
                               positions[i0:i1], mask_t))
    return torch.cat(outs, 2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
