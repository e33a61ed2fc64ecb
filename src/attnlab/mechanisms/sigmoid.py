"""Sigmoid self-attention."""

from __future__ import annotations

import math

from torch import Tensor

from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.sigmoid import sigmoid_attention, sigmoid_weights


@register("sigmoid", family="scored",
          paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention", causal=True,
          bidirectional=True, decode=True, domains=("seq", "image"), complexity="n^2 d",
          weights=True, cross=True, variants=({"hybrid_norm": True, "qk_norm": True},))
class SigmoidAttention(Attention):
    """Sigmoid attention: O = sigmoid(c Q K^T + b) V, without row normalisation.

    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al.).
    b = -ln(n) with n = ``max_len``, a fixed number (the training context length), so that a
    causal model decodes exactly as it runs in full. ``max_len=None`` uses n = the number of
    keys of each call (bidirectional only). Masked entries weigh exactly 0. The paper
    stabilises training with ``qk_norm=True`` and ``hybrid_norm=True`` (a LayerNorm on the
    attention output).
    Backends: ``tiled`` (CPU default, memory-bounded training), ``reference``, ``flex``.
    """

    backends = ("auto", "reference", "tiled", "flex")

    def __init__(self, dim: int, heads: int, *, max_len: int | None = 1024,
                 hybrid_norm: bool = False, **kwargs) -> None:
        super().__init__(dim, heads, output_norm=hybrid_norm, **kwargs)
        if max_len is None and self.causal:
            raise ValueError("sigmoid: causal attention needs a fixed max_len (b = -ln(max_len))")
        if max_len is not None and max_len < 1:
            raise ValueError(f"sigmoid: max_len must be >= 1, got {max_len}")
        self.max_len = max_len

    def score_bias(self, num_keys: int) -> float:
        """The additive bias b = -ln(n)."""
        return -math.log(self.max_len if self.max_len is not None else max(num_keys, 1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return sigmoid_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                 bias=self.score_bias(k.shape[2]), backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return sigmoid_weights(q, k, causal=self.causal, mask=call.op_mask,
                               bias=self.score_bias(k.shape[2]))
