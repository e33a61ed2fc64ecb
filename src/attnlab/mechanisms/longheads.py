"""LongHeads: every head attends to its own selection of context chunks."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.rotary import Rotary
from attnlab.ops.longheads import chunk_keys, longheads_attention, longheads_weights


@register("longheads", family="sparse",
          paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
          causal=True, bidirectional=False, decode=True, domains=("seq",), complexity="n^2 d",
          weights=True, cross=False, notes="output per tile of queries: memory linear in L",
          variants=({"chunk_size": 2, "budget": 4}, {"chunk_size": 3, "budget": 4, "rope": True}))
class LongHeadsAttention(Attention):
    """Causal attention where each head keeps the first, the previous, the local and its
    best chunks.

    "LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (Lu et al.,
    2024), training-free, as its official code (LuLuLuyi/LongHeads) computes it: chunks of
    w = ``chunk_size`` keys; chunk c's key is attention-pooled,
    kbar_c = softmax(vbar_c . K_c^T / sqrt(d)) K_c with vbar_c the mean output of the
    chunk's tokens attending to each other (``attnlab.ops.longheads.chunk_keys``); head h
    scores chunk c with q_i . kbar_c, keeps chunk 0, the previous chunk, the query's chunk and
    the top-scoring others among 1 .. c - 2, ``budget`` chunks in all, and
    O_i = softmax over the kept keys j <= i of c q_i.k_j. With ``rope`` the positions are
    re-indexed inside the selection (``attnlab.ops.longheads``; the chunk keys use RoPE by
    the offset in the chunk), so hook_q / hook_k hold the un-rotated q and k. A context of at
    most ``budget`` chunks is plain causal attention. Defaults: the official w = 256 and
    16 chunks (atten_length 4096). The decoding state keeps the queries too (the chunk keys
    need them). The output is computed per tile of query rows (each tile's (rows, Lk)
    weights recomputed in the backward); ``weights()`` is the dense matrix.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "chunk_size": Arg("int", low=1),
        "budget": Arg("int", low=3),  # the first, the previous and the local chunk
    }

    positions_refusal: ClassVar[str | None] = (
        "it rotates q and k by positions re-indexed inside each query's selection of chunks, "
        "counted from the tokens' order in the sequence (as LongHeads does), so absolute or "
        "per-row positions have no place in it; a left-padded batch also shifts its chunk "
        "boundaries: run sequences of different lengths one at a time")

    def __init__(self, dim: int, heads: int, *, chunk_size: int = 256, budget: int = 16,
                 **kwargs) -> None:
        kwargs.setdefault("rotary", partial(Rotary, float32_frequencies=True))
        super().__init__(dim, heads, **kwargs)
        self.chunk_size, self.budget = chunk_size, budget

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call
                ) -> tuple[Tensor, Tensor, Tensor]:
        q, k = self.qk_norm(q, k)
        # the chunk keys need every key token's query: the state keeps them next to k, v
        call.extras["key_queries"] = q if call.state is None else \
            call.state.append("q", q, dim=2)
        call.extras["values"] = v
        return q, k, v  # RoPE is applied per selection, with re-indexed positions

    def update_state(self, k: Tensor, v: Tensor, call: Call
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        k, v, key_mask = super().update_state(k, v, call)
        call.extras["values"] = v  # every cached value, for hook_weights' chunk keys
        return k, v, key_mask

    def _options(self, k: Tensor, v: Tensor, call: Call) -> dict:
        rotate = self.rotary if self.uses_rope else None
        keys = chunk_keys(call.extras["key_queries"], k, v, chunk_size=self.chunk_size,
                          key_mask=call.key_mask, rotate=rotate)
        return {"keys": keys, "chunk_size": self.chunk_size, "budget": self.budget,
                "key_mask": call.key_mask, "rotate": rotate}

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return longheads_weights(q, k, call.index,
                                 **self._options(k, call.extras["values"], call))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return longheads_attention(q, k, v, call.index, **self._options(k, v, call))
