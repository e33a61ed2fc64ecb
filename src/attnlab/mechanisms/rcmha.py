"""Relative Convolutional Multi-Head Attention (RCMHA)."""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import ConvolvedQKVProjection
from attnlab.ops.common import upcast
from attnlab.ops.tiled import auto_block_size, keys_seen, recomputed, row_tiles


def sinusoid(distances: Tensor, dim: int) -> Tensor:
    """Transformer-XL's sinusoidal embedding of (non-negative) distances, (n, dim)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=distances.device).float() / dim))
    angles = distances.float()[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], -1)[:, :dim]


@register("rcmha", family="scored",
          paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language "
                "Modelling", causal=True, bidirectional=False, decode=True, domains=("seq",),
          complexity="n^2 d", weights=True, cross=False, unsupported=("rope",),
          variants=({"kv_heads": 2},))
class RelativeConvolutionalAttention(Attention):
    """Causal attention with depthwise-convolved q, k, v and Transformer-XL relative scores.

    "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
    (Sugiharto et al., 2023): q, k and v each pass a causal depthwise Conv1d (kernel 3)
    after their projection; A_ij = c [(q_i + u).k_j + (q_i + v').r_{i-j}] with learnable
    per-head u, v' and r_{i-j} = W_r sinusoid(i - j) (Transformer-XL); O = softmax(A) V.
    Decoding carries the convolutions' last two inputs next to the KV cache.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "kernel": Arg("int", low=1),
    }

    def __init__(self, dim: int, heads: int, *, kernel: int = 3, **kwargs) -> None:
        super().__init__(dim, heads,
                         projection=functools.partial(ConvolvedQKVProjection, kernel=kernel),
                         **kwargs)
        h, d = self.heads, self.head_dim
        self.u = nn.Parameter(torch.zeros(h, d))
        self.v_bias = nn.Parameter(torch.zeros(h, d))
        self.rel_proj = nn.Linear(dim, h * d, bias=False)

    def _relative(self, lk: int, like: Tensor) -> Tensor:
        """r_d = W_r sinusoid(d) for the distances d = 0 .. lk - 1, (H, lk, D) in like's dtype."""
        distances = torch.arange(lk, device=like.device)
        rel = self.rel_proj(sinusoid(distances, self.dim).to(self.rel_proj.weight.dtype))
        return rel.to(like.dtype).view(lk, self.heads, self.head_dim).transpose(0, 1)

    def _rows(self, q: Tensor, k: Tensor, rel: Tensor, positions: Tensor,
              key_mask: Tensor | None) -> Tensor:
        """The weights of the queries q (B, H, n, D) at absolute ``positions`` (n,) over the
        keys k (B, H, Lk, D) at positions 0 .. Lk - 1 (q, k upcast, k's heads expanded)."""
        lk, d = k.shape[2], q.shape[-1]
        content = (q + self.u.to(q.dtype)[:, None, :]) @ k.transpose(-1, -2)
        by_distance = (q + self.v_bias.to(q.dtype)[:, None, :]) @ rel[:, :lk].transpose(-1, -2)
        gap = positions[:, None] - torch.arange(lk, device=q.device)[None, :]  # i - j
        index = gap.clamp(0, lk - 1).expand(*q.shape[:3], lk)
        scores = (content + by_distance.gather(-1, index)) / math.sqrt(d)
        vis = (gap >= 0)[None, None]
        if key_mask is not None:
            vis = vis & key_mask[:, None, None, :lk]
        scores = scores.masked_fill(~vis, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, -1) * vis.any(-1, keepdim=True)

    def _tile(self, q: Tensor, k: Tensor, v: Tensor, rel: Tensor, positions: Tensor,
              key_mask: Tensor | None) -> Tensor:
        return self._rows(q, k, rel, positions, key_mask).to(v.dtype) @ v

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        q, k = upcast(q, self.expand_kv(k))
        return self._rows(q, k, self._relative(k.shape[2], q), call.positions, call.key_mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """The output a tile of query rows at a time, each recomputed in the backward: memory
        O(tile L) instead of the (B, H, L, L) weights. The queries are the last Lq of the Lk
        keys (as ``Call.positions`` has them), so a tile sees no key past its last row."""
        q, k = upcast(q, self.expand_kv(k))
        v = self.expand_kv(v)
        lq, lk = q.shape[2], k.shape[2]
        rel = self._relative(lk, q)
        rows = auto_block_size(q.shape[0] * q.shape[1], lk)
        outs = []
        for i0, i1 in row_tiles(lq, rows):
            kend = keys_seen(i1, lq, lk, True)
            outs.append(recomputed(self._tile, q[:, :, i0:i1], k[:, :, :kend], v[:, :, :kend],
                                   rel, call.positions[i0:i1], call.key_mask))
        return torch.cat(outs, 2)
