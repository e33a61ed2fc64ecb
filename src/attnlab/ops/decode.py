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
from attnlab.ops.common import check_qkv, default_scale, expand_kv, shifted_exp, upcast


def _segment(q: Tensor, k: Tensor, v: Tensor, vis: Tensor | None, scale: float):
    """(max, sum-exp, partial output) of one key segment; empty rows give (-inf, 0, 0)."""
    s = (q @ k.transpose(-1, -2)) * scale
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    p, m = shifted_exp(s)
    l_sum = p.sum(-1, keepdim=True)
    o = (p @ v) / l_sum.clamp_min(1e-30)
    return m, l_sum, o


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, splits: int = 4,
                     causal: bool = False, mask: Tensor | None = None,
                     scale: float | None = None) -> Tensor:
    """Softmax attention of a few queries over a long cache, computed in ``splits`` segments.

    ``q`` (B, H, Lq, D), ``k_cache``/``v_cache`` (B, H_kv, T, D); ``mask`` bool, True = may
    attend, broadcastable to (B, H, Lq, T); ``causal`` aligns the queries to the end of the
    cache. Rows with no visible key return 0. Returns (B, H, Lq, Dv) in q's dtype.
    """
    check_qkv("decode_attention", q, k_cache, v_cache, mask)
    if splits < 1:
        raise ValueError(f"decode_attention: splits must be >= 1, got {splits}")
    scale = default_scale(q, scale)
    k, v = expand_kv(k_cache, q.shape[1]), expand_kv(v_cache, q.shape[1])
    q32, k32, v32 = upcast(q, k, v)
    total = k.shape[2]
    vis = visibility(q.shape[2], total, causal=causal, mask=mask, device=q.device)
    bounds = torch.linspace(0, total, min(splits, max(total, 1)) + 1).round().long().tolist()
    parts = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            seg_vis = None if vis is None else vis[..., a:b]
            parts.append(_segment(q32, k32[:, :, a:b], v32[:, :, a:b], seg_vis, scale))
    m_all = torch.stack([p[0] for p in parts])
    top = m_all.amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weights = [p[1] * torch.exp(p[0] - top) for p in parts]  # l_s exp(m_s - M); 0 if empty
    total_weight = sum(weights)
    out = sum(w * p[2] for w, p in zip(weights, parts, strict=True))
    return (out / total_weight.clamp_min(1e-30)).to(q.dtype)
