"""Single-head attention of SHViT: attention on a part of the channels, the rest untouched."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import QKVProjection
from attnlab.ops.softmax import softmax_attention, softmax_weights


@register("shvit", family="scored",
          paper="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design",
          causal=True, bidirectional=True, decode=True, domains=("image", "seq"),
          complexity="n^2 d_qk", weights=True, cross=False,
          variants=({"partial": 0.5, "qk_dim": 4},))
class SingleHeadAttention(Attention):
    """Attention on the first ``partial`` of the channels; the other channels pass untouched.

    "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (Yun & Ro,
    2024): split x = [x_p, x_r] with x_p the first p = ``partial`` * C channels;
    A = softmax(c (x_p W_q)(x_p W_k)^T) with q, k of size ``qk_dim`` = 16;
    out = W_o act([A x_p W_v, x_r]) with act = ReLU. The paper uses one head (``heads=1``);
    with more heads the p channels are split between them (q, k keep ``qk_dim`` per head).
    ``hook_heads`` holds the attention part, (B, L, H, p / H).
    """

    backends = ("auto", "reference", "sdpa", "flex")

    arguments: ClassVar[dict[str, Arg]] = {
        "partial": Arg("float", low=0, low_open=True, high=1),
        "qk_dim": Arg("int", low=1),
    }

    def __init__(self, dim: int, heads: int, *, partial: float = 0.25, qk_dim: int = 16,
                 **kwargs) -> None:
        channels = max(heads, round(dim * partial / heads) * heads)
        if "head_dim" in kwargs:
            raise ValueError("shvit: the head width is partial * dim / heads; pass partial")
        # the output projection comes after the concatenation with the other channels (post)
        super().__init__(dim, heads, head_dim=channels // heads, qk_dim=qk_dim,
                         projection=functools.partial(QKVProjection, channels=channels),
                         output_projection=False, **kwargs)
        self.partial_channels = channels
        self.proj = nn.Linear(dim, dim, bias=kwargs.get("bias", False))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return softmax_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                 backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return softmax_weights(q, k, causal=self.causal, mask=call.op_mask)

    def post(self, y: Tensor, call: Call) -> Tensor:
        rest = call.x[..., self.partial_channels:]
        return self.proj(torch.relu(torch.cat([y, rest.to(y.dtype)], -1)))
