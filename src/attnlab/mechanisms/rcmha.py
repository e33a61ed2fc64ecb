"""Relative Convolutional Multi-Head Attention (RCMHA)."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.causal_conv import CausalConv1d
from attnlab.modules.projections import split_heads
from attnlab.modules.reset import replay_draws, reset_module
from attnlab.ops.common import upcast
from attnlab.ops.tiled import auto_block_size, keys_seen, recomputed, row_tiles


class HeadSharedConv(CausalConv1d):
    """A causal depthwise Conv1d over time on each head's channels, one kernel per channel of
    a head shared by all heads (the official ``SpatialDepthWiseConvolution(d_k)`` run on
    batch x heads sequences); (B, L, heads * D) in and out, history (B, kernel - 1, heads * D)."""

    def __init__(self, head_dim: int, kernel: int) -> None:
        super().__init__(head_dim, kernel, groups=head_dim)

    def forward(self, x: Tensor, keep: Tensor | None = None, history: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        b, length, width = x.shape
        d = self.conv.in_channels
        heads = width // d

        def per_head(t: Tensor) -> Tensor:  # (B, L, H D) -> (B H, L, D)
            return t.unflatten(-1, (heads, d)).transpose(1, 2).flatten(0, 1)

        def merged(t: Tensor) -> Tensor:  # (B H, L, D) -> (B, L, H D)
            return t.unflatten(0, (b, heads)).transpose(1, 2).flatten(2)

        keep = None if keep is None else keep.repeat_interleave(heads, 0)
        y, rest = super().forward(per_head(x), keep,
                                  None if history is None else per_head(history))
        return merged(y), merged(rest)


class RelativeConvolvedProjection(nn.Module):
    """The official q, k, v: a linear map (q and k with ``bias``, v always biased) and a
    head-shared causal depthwise convolution each; the convolutions' last inputs travel in
    the decoding state."""

    def __init__(self, shape: HeadShape, *, kernel: int, value_bias: bool) -> None:
        super().__init__()
        self.shape = shape
        self.q = nn.Linear(shape.dim, shape.heads * shape.qk_dim, bias=shape.bias)
        self.k = nn.Linear(shape.dim, shape.kv_heads * shape.qk_dim, bias=shape.bias)
        self.v = nn.Linear(shape.dim, shape.kv_heads * shape.head_dim, bias=value_bias)
        self.conv_q = HeadSharedConv(shape.qk_dim, kernel)
        self.conv_k = HeadSharedConv(shape.qk_dim, kernel)
        self.conv_v = HeadSharedConv(shape.head_dim, kernel)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, keep, state = call.x, call.key_mask, call.state
        out, history = [], {}
        for name, heads in (("q", self.shape.heads), ("k", self.shape.kv_heads),
                            ("v", self.shape.kv_heads)):
            past = state.get(f"conv_{name}") if state is not None else None
            conv = getattr(self, f"conv_{name}")
            y, history[f"conv_{name}"] = conv(getattr(self, name)(x), keep, past)
            out.append(split_heads(y, heads))
        if state is not None:
            state.put(**history)
        return out[0], out[1], out[2]


@register("rcmha", family="scored",
          paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language "
                "Modelling", causal=True, bidirectional=False, decode=True, domains=("seq",),
          complexity="n^2 d", weights=True, cross=False, unsupported=("rope",),
          variants=({"kv_heads": 2}, {"position_bias": False, "max_len": 16}))
class RelativeConvolutionalAttention(Attention):
    """Causal attention with convolved q, k, v and learned relative position scores.

    "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
    (Sugiharto et al., 2023), as its official ``RelativeMultiHeadAttention``
    (hermansh-id/rcmha) computes it: q, k (no bias) and v (with bias) each pass a causal
    depthwise Conv1d (kernel 3, with bias) whose kernel per head channel is shared by all
    heads; with P = ``max_len`` and learned tables E (2P, H, D), b (2P, H) and u (H, D),
    all starting at 0,

        A_ij = c [(q_i + u).k_j + q_i.E[P - (i - j)] + b[P - (i - j)]],   O = softmax(A) V

    and an output projection with bias. ``position_bias=False`` drops E and b. A distance
    beyond P reads row 0, the farthest (the official cannot run past P tokens). Decoding
    carries the convolutions' last two inputs next to the KV cache.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "kernel": Arg("int", low=1),
        "max_len": Arg("int", low=1),
        "position_bias": Arg("bool"),
        "value_bias": Arg("bool"),
        "output_bias": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, kernel: int = 3, max_len: int = 4096,
                 position_bias: bool = True, value_bias: bool = True,
                 output_bias: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, projection=lambda shape: RelativeConvolvedProjection(
            shape, kernel=kernel, value_bias=value_bias), **kwargs)
        h, d = self.heads, self.head_dim
        self._own_o_proj = output_bias != self.shape.bias
        if self._own_o_proj:
            self.o_proj = nn.Linear(h * d, dim, bias=output_bias)
        self.max_len, self.position_bias = max_len, position_bias
        self.u = nn.Parameter(torch.zeros(h, d))
        if position_bias:
            self.rel_emb = nn.Parameter(torch.zeros(2 * max_len, h, d))
            self.rel_bias = nn.Parameter(torch.zeros(2 * max_len, h))

    def _reset_part(self, name: str) -> None:
        if name == "o_proj" and self._own_o_proj:  # replaced: replay the base's draws here
            replay_draws(lambda: nn.Linear(self.heads * self.head_dim, self.dim,
                                           bias=self.shape.bias),
                         like=cast(Tensor, self.o_proj.weight))
            return
        super()._reset_part(name)

    def _reset_own(self) -> None:
        if self._own_o_proj:
            reset_module(self.o_proj)
        for t in (self.u, getattr(self, "rel_emb", None), getattr(self, "rel_bias", None)):
            if t is not None:
                t.zero_()

    def _relative(self, lk: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """E and b at the distances d = 0 .. lk - 1 (rows P - d; a distance beyond P reads
        row 0, the farthest): (H, lk, D), (H, lk)."""
        if not self.position_bias:
            return None
        rows = (self.max_len - torch.arange(lk, device=like.device)).clamp_min(0)
        return (self.rel_emb[rows].to(like.dtype).transpose(0, 1),
                self.rel_bias[rows].to(like.dtype).transpose(0, 1))

    def _rows(self, q: Tensor, k: Tensor, rel: tuple[Tensor, Tensor] | None,
              positions: Tensor, key_mask: Tensor | None) -> Tensor:
        """The weights of the queries q (B, H, n, D) at absolute ``positions`` (n,) over the
        keys k (B, H, Lk, D) at positions 0 .. Lk - 1 (q, k upcast, k's heads expanded)."""
        lk, d = k.shape[2], q.shape[-1]
        scores = (q + self.u.to(q.dtype)[:, None, :]) @ k.transpose(-1, -2)
        gap = positions[:, None] - torch.arange(lk, device=q.device)[None, :]  # i - j
        if rel is not None:
            emb, bias = rel
            by_distance = q @ emb[:, :lk].transpose(-1, -2) + bias[:, None, :lk]
            index = gap.clamp(0, lk - 1).expand(*q.shape[:3], lk)
            scores = scores + by_distance.gather(-1, index)
        scores = scores / math.sqrt(d)
        vis = (gap >= 0)[None, None]
        if key_mask is not None:
            vis = vis & key_mask[:, None, None, :lk]
        scores = scores.masked_fill(~vis, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, -1) * vis.any(-1, keepdim=True)

    def _tile(self, q: Tensor, k: Tensor, v: Tensor, emb: Tensor | None, bias: Tensor | None,
              positions: Tensor, key_mask: Tensor | None) -> Tensor:
        rel = None if emb is None else (emb, cast(Tensor, bias))
        return self._rows(q, k, rel, positions, key_mask).to(v.dtype) @ v

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        q, k = upcast(q, self.expand_kv(k))
        return self._rows(q, k, self._relative(k.shape[2], q), call.index, call.key_mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """The output a tile of query rows at a time, each recomputed in the backward: memory
        O(tile L) instead of the (B, H, L, L) weights. The queries are the last Lq of the Lk
        keys (as ``Call.index`` has them), so a tile sees no key past its last row."""
        q, k = upcast(q, self.expand_kv(k))
        v = self.expand_kv(v)
        lq, lk = q.shape[2], k.shape[2]
        emb, bias = self._relative(lk, q) or (None, None)
        rows = auto_block_size(q.shape[0] * q.shape[1], lk)
        outs = []
        for i0, i1 in row_tiles(lq, rows):
            kend = keys_seen(i1, lq, lk, True)
            outs.append(recomputed(self._tile, q[:, :, i0:i1], k[:, :, :kend], v[:, :, :kend],
                                   emb, bias, call.index[i0:i1], call.key_mask))
        return torch.cat(outs, 2)
