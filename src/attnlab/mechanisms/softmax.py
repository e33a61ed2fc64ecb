"""Multi-head softmax attention, the baseline of every comparison."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.decode import decode_attention
from attnlab.ops.softmax import softmax_attention, softmax_weights


@register("softmax", family="scored", paper="Attention Is All You Need", causal=True,
          bidirectional=True, decode=True, domains=("seq", "image"), complexity="n^2 d",
          weights=True, cross=True, variants=({"kv_heads": 2}, {"kv_heads": 1}))
class SoftmaxAttention(Attention):
    """Multi-head softmax attention (MHA, and GQA / MQA through ``kv_heads``).

    "Attention Is All You Need" (Vaswani et al., 2017):
    O = softmax(c Q K^T + mask) V with c = d^-1/2, per head; with ``kv_heads < heads`` each
    key/value head serves ``heads / kv_heads`` query heads (GQA; ``kv_heads=1`` is MQA).
    Backends: ``sdpa`` (default), ``reference``, ``flex``. Decoding a few tokens over a cache
    of at least ``decode_split_min`` keys uses split-KV ``decode_attention`` (segments of
    ``decode_segment`` keys, by default the op's choice; exact merge, GQA without copying the
    cache).
    """

    backends = ("auto", "reference", "sdpa", "flex")
    decode_split_min = 1024  # cache length from which decoding uses decode_attention
    decode_segment: int | None = None  # keys per segment; None: decode_attention's choice

    arguments: ClassVar[dict[str, Arg]] = {}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        if call.state is not None and self.backend == "auto" and q.shape[2] <= 16 and \
                k.shape[2] >= self.decode_split_min:
            splits = None if self.decode_segment is None else -(-k.shape[2] //
                                                                self.decode_segment)
            return decode_attention(q, k, v, splits=splits, causal=self.causal,
                                    mask=call.op_mask)
        return softmax_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                 backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return softmax_weights(q, k, causal=self.causal, mask=call.op_mask)
