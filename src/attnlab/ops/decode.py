"""Split-KV decoding with an exact merge (Lean attention's decomposition).

"Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of
Transformers": split the cached keys into segments of (near) equal work, compute per segment
the row max m_s, the sum of exponentials l_s = sum_j exp(c q.k_j - m_s) and the partial
output o_s = sum_j exp(c q.k_j - m_s) v_j / l_s, then merge exactly:

    M = max_s m_s,   L = sum_s l_s exp(m_s - M),   O = sum_s l_s exp(m_s - M) o_s / L.

The result is the softmax attention over all keys, whatever the split.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.core.masks import visibility
from attnlab.ops.common import default_scale, guarded_op, shifted_exp, upcast


@guarded_op("decode_attention")
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, splits: int = 4,
                     causal: bool = False, mask: Tensor | None = None,
                     scale: float | None = None) -> Tensor:
    """Softmax attention of a few queries over a long cache, computed in ``splits`` segments.

    ``q`` (B, H, Lq, D), ``k_cache``/``v_cache`` (B, H_kv, T, D); ``mask`` bool, True = may
    attend, broadcastable to (B, H, Lq, T); ``causal`` aligns the queries to the end of the
    cache. The segments have equal length (plus one shorter last segment) and are computed
    together (views of the cache, one batched matmul for the scores and one for the partial
    outputs), then merged exactly; GQA never copies the cache. Rows with no visible key
    return 0. Returns (B, H, Lq, Dv) in q's dtype.
    """
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"decode_attention: splits must be >= 1, got {splits}")
    scale = default_scale(q, scale)
    b, h, lq, d = q.shape
    h_kv, total = k_cache.shape[1], k_cache.shape[2]
    groups = h // h_kv
    vis = visibility(lq, total, causal=causal, mask=mask, device=q.device)
    # GQA without copying the cache: the query heads of one kv head become extra rows
    q32, k32, v32 = upcast(q.reshape(b, h_kv, groups * lq, d), k_cache, v_cache)
    if vis is not None:
        vis = vis.reshape((1,) * (4 - vis.dim()) + tuple(vis.shape))  # (B or 1, H or 1, Lq, T)
        vis = vis.expand(vis.shape[0], h, lq, total).reshape(vis.shape[0], h_kv,
                                                             groups * lq, total)
    seg = -(-total // min(splits, max(total, 1))) if total else 1
    full = total // seg
    stats = []  # (max, sum-exp, partial output) per segment, each (B, H_kv, n, rows, .)
    if full:  # the equal segments, as views of the cache (no copy)
        stats.append(_segments(q32, k32[:, :, :full * seg], v32[:, :, :full * seg],
                               None if vis is None else vis[..., :full * seg], full, scale))
    if total - full * seg or not full:  # the shorter last segment (or an empty cache)
        stats.append(_segments(q32, k32[:, :, full * seg:], v32[:, :, full * seg:],
                               None if vis is None else vis[..., full * seg:], 1, scale))
    m, l_sum, o = (torch.cat(parts, 2) for parts in zip(*stats, strict=True))
    top = m.amax(2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight = l_sum * torch.exp(m - top)  # l_s exp(m_s - M); 0 for an empty segment
    out = (weight * o).sum(2) / weight.sum(2).clamp_min(1e-30)  # (B, H_kv, G * Lq, Dv)
    return out.reshape(b, h, lq, -1).to(q.dtype)


def _segments(q: Tensor, k: Tensor, v: Tensor, vis: Tensor | None, n_seg: int, scale: float
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of ``n_seg`` equal segments of k, v (B, H, n_seg * seg, D) for q (B, H, R, D):
    the row max m_s, sum of exp(s - m_s) and the partial output, each (B, H, n_seg, R, .).
    A segment with no visible key gives (-inf, 0, 0). The scores are one matmul against the
    transposed view of the cache (the cache is never copied); the partial outputs one batched
    matmul over the segments."""
    s = (q @ k.transpose(-1, -2) * scale).unflatten(-1, (n_seg, -1))  # (B, H, R, n, seg)
    if vis is not None:
        s = s.masked_fill(~vis.unflatten(-1, (n_seg, -1)), float("-inf"))
    p, m = shifted_exp(s)
    l_sum = p.sum(-1, keepdim=True)
    m, l_sum = m.transpose(2, 3), l_sum.transpose(2, 3)  # (B, H, n, R, 1)
    out = p.transpose(2, 3) @ v.unflatten(2, (n_seg, -1))  # (B, H, n, R, Dv)
    return m, l_sum, out / l_sum.clamp_min(1e-30)
