"""Softmax attention: O = softmax(c Q K^T + bias + mask) V ("Attention Is All You Need")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.masks import visibility
from attnlab.ops.common import (
    begin,
    begin_weights,
    check_op_bias,
    checked_weights,
    default_scale,
    guarded_op,
    unit_last_stride,
    upcast,
)
from attnlab.ops.flex import flex_call

BACKENDS = ("sdpa", "flex", "reference")  # in order of preference for backend="auto"


@checked_weights("softmax_weights")
def softmax_weights(q: Tensor, k: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                    scale: float | None = None, bias: float | Tensor | None = None) -> Tensor:
    """Softmax attention weights W_ij = softmax_j(c q_i.k_j + bias_ij) over the visible keys.

    Args:
        q: (B, H, Lq, D) queries; k: (B, H_kv, Lk, D) keys, H_kv dividing H (GQA).
        causal: query i sees keys j <= i + (Lk - Lq) (queries aligned to the end of the keys).
        mask: bool, True = may attend, broadcastable to (B, H, Lq, Lk).
        scale: c, default 1/sqrt(D). bias: added to the scores (float or broadcastable tensor).

    Returns (B, H, Lq, Lk) in float32 at least; a row with no visible key is 0.
    """
    k, visible = begin_weights("softmax_weights", q, k, causal=causal, mask=mask)
    check_op_bias("softmax_weights", bias, q, k)
    scale = default_scale(q, scale)
    q, k = upcast(q, k)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
        # a key whose bias is -inf is hidden like a masked one: a row whose every key is
        # hidden sees nothing and is 0 (softmax of -inf everywhere is NaN)
        hidden = s == float("-inf")
        visible = ~hidden if visible is None else visible & ~hidden
    if visible is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(~visible, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) * visible.any(-1, keepdim=True)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None, scale: float,
          bias: float | Tensor | None) -> Tensor:
    lq, lk = q.shape[2], k.shape[2]
    q, k, v = unit_last_stride(q, k, v)
    if mask is None and bias is None and (not causal or lq == lk or lq == 1):
        # bool(): under torch.export with a symbolic length the comparison is a SymBool,
        # which SDPA refuses (the conversion records the condition as a guard)
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=bool(causal and lq == lk and lq > 1), scale=scale)
    vis = visibility(lq, lk, causal=causal, mask=mask, device=q.device)
    if vis is None:
        vis = torch.ones(1, 1, 1, lk, dtype=torch.bool, device=q.device)
    attn_mask = vis
    if bias is not None:
        # -inf at the keys a query may not see, whatever the bias holds there (a NaN bias
        # at a masked key made every output NaN); a -inf bias hides its key too
        attn_mask = torch.where(vis, torch.as_tensor(bias, dtype=q.dtype, device=q.device),
                                float("-inf"))
        vis = attn_mask != float("-inf")
    # give rows that see no key something to attend to, then zero them (branch-free: no
    # host sync, one graph under torch.compile; a no-op on the other rows)
    empty = ~vis.any(-1, keepdim=True)
    attn_mask = attn_mask | empty if bias is None else attn_mask.masked_fill(empty, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.masked_fill(empty, 0.0)


@guarded_op("softmax_attention")
def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      mask: Tensor | None = None, scale: float | None = None,
                      bias: float | Tensor | None = None, backend: str = "auto") -> Tensor:
    """Multi-head softmax attention on (B, H, L, D) tensors (k, v may have fewer heads: GQA).

    ``causal`` aligns queries to the end of the keys (KV-cache convention); ``mask`` is bool,
    True = may attend, broadcastable to (B, H, Lq, Lk); ``bias`` is added to the scores.
    Backends: ``reference`` (dense), ``sdpa`` (CPU/CUDA default), ``flex`` (FlexAttention).
    """
    scale = default_scale(q, scale)
    name, q, k, v = begin("softmax_attention", backend, BACKENDS, q, k, v,
                       tensor_bias=isinstance(bias, Tensor))
    if name == "reference":
        w = softmax_weights(q, k, causal=causal, mask=mask, scale=scale, bias=bias)
        return w.to(v.dtype) @ v
    if name == "sdpa":
        return _sdpa(q, k, v, causal=causal, mask=mask, scale=scale, bias=bias)
    score_mod = None if bias is None else (lambda s, b, h, i, j: s + bias)
    return flex_call(q, k, v, causal=causal, mask=mask, score_mod=score_mod, scale=scale)
