"""LongHeads: every head attends to its own selection of context chunks."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.longheads import longheads_attention, longheads_weights


@register("longheads", family="sparse",
          paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
          causal=True, bidirectional=False, decode=True, domains=("seq",), complexity="n^2 d",
          weights=True, cross=False, notes="output per tile of queries: memory linear in L",
          variants=({"chunk_size": 2, "budget": 3}, {"chunk_size": 3, "budget": 2, "rope": True}))
class LongHeadsAttention(Attention):
    """Causal attention where each head keeps the first, the local and its best chunks.

    "LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (Lu et al.,
    2024), training-free: chunks of w = ``chunk_size`` keys, chunk score q_i . mean(k in c),
    each head keeps chunk 0, the query's chunk and the top-scoring earlier chunks, ``budget``
    chunks in all, and O_i = softmax over the kept keys j <= i of c q_i.k_j. With ``rope``
    the positions are re-indexed inside the selection (``attnlab.ops.longheads``), so
    hook_q / hook_k hold the un-rotated q and k. A context of at most ``budget`` chunks is
    plain causal attention. The output is computed per tile of query rows (each tile's
    (rows, Lk) weights recomputed in the backward); ``weights()`` is the dense matrix.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "chunk_size": Arg("int", low=1),
        "budget": Arg("int", low=2),  # the first and the local chunk
    }

    def __init__(self, dim: int, heads: int, *, chunk_size: int = 64, budget: int = 8,
                 **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.chunk_size, self.budget = chunk_size, budget

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call
                ) -> tuple[Tensor, Tensor, Tensor]:
        q, k = self.qk_norm(q, k)
        return q, k, v  # RoPE is applied per selection, with re-indexed positions

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return longheads_weights(q, k, call.positions, chunk_size=self.chunk_size,
                                 budget=self.budget, key_mask=call.key_mask,
                                 rotate=self.rotary if self.uses_rope else None)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return longheads_attention(q, k, v, call.positions, chunk_size=self.chunk_size,
                                   budget=self.budget, key_mask=call.key_mask,
                                   rotate=self.rotary if self.uses_rope else None)
