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
    begin_weights,
    check_op_bias,
    checked_weights,
    default_scale,
    expand_kv,
    guarded_op,
    upcast,
)
from attnlab.ops.dispatch import choose
from attnlab.ops.flex import flex_call
from attnlab.ops.tiled import BlockVisibility, RowMath, row_tiled

# in order of preference for backend="auto" (which takes "triton" on CUDA only: see
# attnlab.ops.triton.why_not)
BACKENDS = ("triton", "flex", "tiled", "reference")
TRITON_MAX_HEAD_DIM = 256


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


def triton_limits(q: Tensor, v: Tensor, bias: float | Tensor, block_size: int | None
                  ) -> str | None:
    """Why the triton kernel cannot serve this call (None: it can): it takes float16,
    bfloat16 or float32 inputs (bfloat16 not under Triton's interpreter, which has no
    bfloat16 arithmetic), head dims 1..256, a float or per-head bias, and a block size that
    is a power of two from 16 (``tl.dot``'s least tile side) to 128; any bool mask."""
    from attnlab.ops.triton.common import input_limits  # imports triton: only when asked

    why = input_limits(q, v, TRITON_MAX_HEAD_DIM)
    if why is not None:
        return why
    if isinstance(bias, Tensor):
        shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        if shape[0] != 1 or shape[2:] != (1, 1):
            return ("the triton kernel takes a float bias or a per-head tensor bias, shape "
                    f"(1, H, 1, 1) or (H, 1, 1); got {tuple(bias.shape)} (a bias (H,) adds "
                    "along the keys, not the heads)")
    if block_size is not None and (not 16 <= block_size <= 128 or block_size & (block_size - 1)):
        return ("the triton kernel's block_size must be a power of two from 16 to 128, got "
                f"{block_size}")
    return None


@guarded_op("sigmoid_attention")
def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                      mask: Tensor | None = None, scale: float | None = None,
                      bias: float | Tensor | None = None, backend: str = "auto",
                      block_size: int | None = None) -> Tensor:
    """Sigmoid attention on (B, H, L, D) tensors; ``bias`` defaults to ``-ln(Lk)``.

    Backends: ``reference`` (dense), ``tiled`` (memory-bounded forward and backward, the CPU
    default), ``flex`` (FlexAttention with score_mod = log sigmoid = -softplus(-s), rescaled
    by exp(lse); ``F.logsigmoid`` itself fails to compile inside a score_mod on CUDA, torch 2.11),
    ``triton`` (``attnlab.ops.triton.sigmoid``: forward and backward Triton kernels, on CUDA or
    under Triton's interpreter; auto takes it on CUDA; a float or per-head bias, any mask).
    """
    scale = default_scale(q, scale)
    bias = default_bias(k, bias)
    name = choose("sigmoid_attention", backend, BACKENDS, q, k, v,
                  tensor_bias=isinstance(bias, Tensor),
                  limits=lambda n: triton_limits(q, v, bias, block_size) if n == "triton"
                  else None)
    if name == "triton":
        from attnlab.ops.triton.sigmoid import sigmoid_attention_triton

        return sigmoid_attention_triton(q, k, v, causal=causal, mask=mask, scale=scale,
                                        bias=bias, block_size=block_size)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if name == "reference":
        w = sigmoid_weights(q, k, causal=causal, mask=mask, scale=scale, bias=bias)
        return w.to(v.dtype) @ v
    if name == "tiled":
        return row_tiled(SigmoidRows(scale, float(bias)), q, k, v, causal=causal, mask=mask,
                         block_size=block_size)
    out, lse = flex_call(q, k, v, causal=causal, mask=mask, scale=scale, return_lse=True,
                         score_mod=lambda s, b, h, i, j: -F.softplus(-(s + bias)))
    return out * lse.exp().unsqueeze(-1).to(out.dtype)
