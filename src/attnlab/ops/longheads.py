"""LongHeads chunk selection and attention within the selected chunks.

"LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (Lu et al., 2024):
the keys are cut into chunks of w; each head scores every earlier complete chunk c with
q_i . kbar_c (kbar_c the mean key of the chunk), keeps the first chunk, the query's own
(local) chunk and the best-scoring others up to ``budget`` chunks, and attends causally
inside them. Positions are re-indexed so that the selected chunks sit next to each other:
key j in the r-th selected chunk is at r w + (j mod w), the query in its local chunk
likewise, so every head works at in-distribution distances (< budget * w). With RoPE the
score needs the rotation for the distance (r_i - r_j) w + (i mod w) - (j mod w): queries are
rotated once per rank distance delta = r_i - r_j in [0, budget) and keys by (j mod w).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab.ops.common import at_least_float32, expand_kv, upcast
from attnlab.ops.softmax import softmax_weights
from attnlab.ops.tiled import auto_block_size, recomputed, row_tiles


def select_chunks(q: Tensor, k: Tensor, positions: Tensor, *, chunk_size: int, budget: int,
                  key_mask: Tensor | None = None) -> Tensor:
    """Bool (B, H, Lq, C): the chunks each query (absolute ``positions``) keeps."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    n_chunks = -(-lk // chunk_size)
    q, k = upcast(q, expand_kv(k, h))
    pad = n_chunks * chunk_size - lk
    real = torch.ones(b, lk, dtype=k.dtype, device=q.device) if key_mask is None \
        else key_mask.to(k.dtype)
    real = torch.nn.functional.pad(real, (0, pad)).view(b, 1, n_chunks, chunk_size, 1)
    chunks = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, n_chunks, chunk_size, d)
    count = real.sum(3)
    mean = (chunks * real).sum(3) / count.clamp_min(1)  # (B, H, C, D)
    scores = q @ mean.transpose(-1, -2)  # (B, H, Lq, C)
    local = (positions // chunk_size)[:, None]  # (Lq, 1)
    c = torch.arange(n_chunks, device=q.device)[None, :]
    candidate = (c > 0) & (c < local) & (count[..., 0] > 0)[:, :, None, :]
    selected = ((c == 0) | (c == local)).expand(b, h, lq, n_chunks).clone()
    extra = min(max(budget - 2, 0), n_chunks)
    if extra:
        masked = scores.masked_fill(~candidate, float("-inf"))
        top = masked.topk(extra, dim=-1)
        chosen = torch.zeros_like(selected).scatter_(-1, top.indices, True)
        selected |= chosen & candidate
    return selected


def longheads_weights(q: Tensor, k: Tensor, positions: Tensor, *, chunk_size: int, budget: int,
                      key_mask: Tensor | None = None, rotate: Callable | None = None,
                      scale: float | None = None) -> Tensor:
    """Attention weights (B, H, Lq, Lk) of LongHeads; ``rotate(x, positions)`` is RoPE or
    None. q and k are not rotated yet. Rows with no visible key are 0."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    selected = select_chunks(q, k, positions, chunk_size=chunk_size, budget=budget,
                             key_mask=key_mask)
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
    distance = (query_rank - rank).clamp(0, budget - 1)[..., chunk_of_key]  # (B, H, Lq, Lk)
    k_rot = rotate(k, torch.arange(lk, device=q.device) % chunk_size)
    scores = torch.stack([at_least_float32(rotate(q, r * chunk_size + positions % chunk_size))
                          @ at_least_float32(k_rot).transpose(-1, -2) for r in range(budget)])
    s = scores.gather(0, distance.unsqueeze(0)).squeeze(0) * scale
    s = s.masked_fill(~vis, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) * vis.any(-1, keepdim=True)


def longheads_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, *, chunk_size: int,
                        budget: int, key_mask: Tensor | None = None,
                        rotate: Callable | None = None, scale: float | None = None,
                        rows: int | None = None) -> Tensor:
    """``longheads_weights(..) @ v`` one tile of query rows at a time, each tile recomputed
    in the backward, so memory holds one tile's (rows, Lk) weights, never (Lq, Lk).

    A tile only reads the keys up to its last query (causal); chunks before a query's own
    chunk are complete there, so its selection is the one over all keys.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    passes = budget if rotate is not None else 1  # RoPE scores one matrix per rank distance
    rows = rows or auto_block_size(b * h * passes, lk)
    last = positions.max().item() if lq else 0
    if last >= lk:
        raise ValueError(f"longheads: a query at position {last} needs keys up to it, "
                         f"got {lk} keys")

    def tile(q_t: Tensor, k_t: Tensor, v_t: Tensor, pos_t: Tensor, mask_t: Tensor | None
             ) -> Tensor:
        w = longheads_weights(q_t, k_t, pos_t, chunk_size=chunk_size, budget=budget,
                              key_mask=mask_t, rotate=rotate, scale=scale)
        return w.to(v_t.dtype) @ expand_kv(v_t, h)

    outs = []
    for i0, i1 in row_tiles(lq, rows):
        kend = int(positions[i0:i1].max()) + 1
        mask_t = None if key_mask is None else key_mask[:, :kend]
        outs.append(recomputed(tile, q[:, :, i0:i1], k[:, :, :kend], v[:, :, :kend],
                               positions[i0:i1], mask_t))
    return torch.cat(outs, 2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
