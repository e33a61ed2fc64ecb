"""Gated attention: softmax attention with a sigmoid output gate."""

from __future__ import annotations

from attnlab.core.registry import register
from attnlab.mechanisms.softmax import SoftmaxAttention


@register("gated", family="scored",
          paper="Gated Attention for Large Language Models: Non-linearity, Sparsity, and "
                "Attention-Sink-Free", causal=True, bidirectional=True, decode=True,
          domains=("seq", "image"), complexity="n^2 d", weights=True, cross=True,
          variants=({"gate": "headwise"},))
class GatedAttention(SoftmaxAttention):
    """Softmax attention whose per-head output is gated before the output projection.

    "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
    Attention-Sink-Free" (Qiu et al.): Y' = Y * sigmoid(x W_g), x = the block input after its
    norm; ``gate="elementwise"`` (default, one gate per channel) or ``"headwise"`` (one scalar
    per head and token). The same gate is the ``gate=`` option of every mechanism.
    """

    def __init__(self, dim: int, heads: int, *, gate: str = "elementwise", **kwargs) -> None:
        if gate is None:
            raise ValueError("gated: gate must be 'elementwise' or 'headwise' "
                             "(use 'softmax' for the ungated module)")
        super().__init__(dim, heads, gate=gate, **kwargs)
