"""Relative Convolutional Multi-Head Attention (RCMHA)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import ConvolvedQKVProjection
from attnlab.ops.common import upcast


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

    def __init__(self, dim: int, heads: int, *, kernel: int = 3, **kwargs) -> None:
        super().__init__(dim, heads,
                         projection=functools.partial(ConvolvedQKVProjection, kernel=kernel),
                         **kwargs)
        h, d = self.heads, self.head_dim
        self.u = nn.Parameter(torch.zeros(h, d))
        self.v_bias = nn.Parameter(torch.zeros(h, d))
        self.rel_proj = nn.Linear(dim, h * d, bias=False)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        lq, lk, d = q.shape[2], k.shape[2], q.shape[-1]
        q, k = upcast(q, self.expand_kv(k))
        content = (q + self.u.to(q.dtype)[:, None, :]) @ k.transpose(-1, -2)
        distances = torch.arange(lk, device=q.device)
        rel = self.rel_proj(sinusoid(distances, self.dim).to(self.rel_proj.weight.dtype))
        rel = rel.to(q.dtype).view(lk, self.heads, d).transpose(0, 1)  # (H, distance, D)
        by_distance = (q + self.v_bias.to(q.dtype)[:, None, :]) @ rel.transpose(-1, -2)
        gap = call.positions[:, None] - distances[None, :]  # i - j, (Lq, Lk)
        index = gap.clamp(0, lk - 1).expand(q.shape[0], self.heads, lq, lk)
        position = by_distance.gather(-1, index)
        scores = (content + position) / math.sqrt(d)
        vis = (gap >= 0)[None, None]
        if call.key_mask is not None:
            vis = vis & call.key_mask[:, None, None, :]
        scores = scores.masked_fill(~vis, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, -1) * vis.any(-1, keepdim=True)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        w = self.attention_weights(q, k, call)
        return w.to(v.dtype) @ self.expand_kv(v)
