"""Sigmoid attention: O = sigmoid(c Q K^T + b) V, no row normalisation.

"Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al.).
b = -ln(n) by default; masked entries are exactly 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.ops.common import (
    begin,
    begin_weights,
    check_op_bias,
    checked_weights,
    default_scale,
    guarded_op,
    upcast,
)
from attnlab.ops.flex import flex_call
from attnlab.ops.tiled import BlockVisibility, RowMath, row_tiled

BACKENDS = ("flex", "tiled", "reference")  # in order of preference for backend="auto"


@checked_weights("sigmoid_weights")
def sigmoid_weights(q: Tensor, k: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                    scale: float | None = None, bias: float | Tensor | None = None) -> Tensor:
    """Sigmoid attention weights W_ij = sigmoid(c q_i.k_j + b) for visible j, exactly 0
    elsewhere (rows are not normalised).

    Args:
        q: (B, H, Lq, D) queries; k: (B, H_kv, Lk, D) keys, H_kv dividing H (GQA).
        causal, mask: which keys each query sees, as in :func:`sigmoid_attention`.
        scale: c, default 1/sqrt(D). bias: b, default -ln(Lk).

    Returns (B, H, Lq, Lk) in float32 at least.
    """
    k, visible = begin_weights("sigmoid_weights", q, k, causal=causal, mask=mask)
    check_op_bias("sigmoid_weights", bias, q, k)
    scale = default_scale(q, scale)
    bias = default_bias(k, bias)
    q, k = upcast(q, k)
    w = torch.sigmoid((q @ k.transpose(-1, -2)) * scale + bias)
    return w if visible is None else w.masked_fill(~visible, 0.0)


def default_bias(k: Tensor, bias: float | Tensor | None) -> float | Tensor:
    """The paper's b = -ln(n) for n = Lk keys, unless a bias is given."""
    return -math.log(max(k.shape[2], 1)) if bias is None else bias


class SigmoidRows(RowMath):
    """Tiled sigmoid weights: w = sigmoid(s), ds = w (1 - w) g (0 where masked, as w is)."""

    def __init__(self, scale: float, bias: float) -> None:
        self.scale, self.bias = scale, bias

    def weights(self, s: Tensor, vis: BlockVisibility | None) -> tuple[Tensor, None]:
        s.sigmoid_()
        if vis is not None:
            vis.fill_(s, 0.0)
        return s, None

    def vjp(self, g, w, aux, vis, rowdot) -> Tensor:
        return torch.ops.aten.sigmoid_backward(g, w)


@guarded_op("sigmoid_attention")
def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      mask: Tensor | None = None, scale: float | None = None,
                      bias: float | Tensor | None = None, backend: str = "auto",
                      block_size: int | None = None) -> Tensor:
    """Sigmoid attention on (B, H, L, D) tensors; ``bias`` defaults to ``-ln(Lk)``.

    Backends: ``reference`` (dense), ``tiled`` (memory-bounded forward and backward, the CPU
    default), ``flex`` (FlexAttention with score_mod = log sigmoid = -softplus(-s), rescaled
    by exp(lse); ``F.logsigmoid`` itself fails to compile inside a score_mod on CUDA, torch 2.11).
    """
    scale = default_scale(q, scale)
    bias = default_bias(k, bias)
    name, q, k, v = begin("sigmoid_attention", backend, BACKENDS, q, k, v,
                       tensor_bias=isinstance(bias, Tensor))
    if name == "reference":
        w = sigmoid_weights(q, k, causal=causal, mask=mask, scale=scale, bias=bias)
        return w.to(v.dtype) @ v
    if name == "tiled":
        return row_tiled(SigmoidRows(scale, float(bias)), q, k, v, causal=causal, mask=mask,
                         block_size=block_size)
    out, lse = flex_call(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=True,
                         score_mod=lambda s, b, h, i, j: -F.softplus(-(s + bias)))
    return out * lse.exp().unsqueeze(-1).to(out.dtype)
