"""Compressed Convolutional Attention (CCA / CCGQA): attention inside a compressed latent."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.causal_conv import CausalConv1d
from attnlab.modules.projections import QKVProjection
from attnlab.ops.softmax import softmax_attention, softmax_weights


@register("cca", family="head-mixing",
          paper="Compressed Convolutional Attention: Efficient Attention in a Compressed "
                "Latent Space", causal=True, bidirectional=False, decode=True, domains=("seq",),
          complexity="n^2 d / c", weights=True, cross=False,
          unsupported=("qk_norm",), variants=({"kv_heads": 2}, {"compression": 4}))
class CompressedConvolutionalAttention(Attention):
    """Causal attention computed entirely in a compressed latent space (CCA; CCGQA with
    ``kv_heads < heads``).

    "Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space"
    (Figliolia et al., 2025): q, k, v are down-projected to latent heads of width
    d_h = C / (heads * ``compression``); [q; k] pass two causal convolutions over time
    (depthwise, kernel 2, then grouped per head, kernel 2) and get the qk-mean residual back
    (q += (q + repeat(k)) / 2, k += (mean_group(q) + k) / 2, with the pre-convolution q, k);
    half of each head's value channels come from the previous token (value shift); q, k are
    L2-normalised to norm sqrt(d_h), k times a learned per-kv-head temperature; softmax
    attention runs in the latent heads and the output projection goes back up. Decoding
    keeps the latent KV cache (2 * kv_heads * d_h numbers per token) plus the convolutions'
    last inputs and the previous token's value projection.
    """

    def __init__(self, dim: int, heads: int, *, compression: int = 2,
                 head_dim: int | None = None, **kwargs) -> None:
        if compression < 1:
            raise ValueError(f"cca: compression must be >= 1, got {compression}")
        head_dim = max(1, dim // (heads * compression)) if head_dim is None else head_dim
        super().__init__(dim, heads, head_dim=head_dim, projection=CompressedConvProjection,
                         **kwargs)
        self.compression = compression

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return softmax_attention(q, k, v, causal=True, mask=call.op_mask)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return softmax_weights(q, k, causal=self.causal, mask=call.op_mask)


class CompressedConvProjection(QKVProjection):
    """CCA's q, k, v: down-projections to the latent heads, two causal convolutions over
    [q; k] with the qk-mean residual, the value shift, and the L2 norm with a learned key
    temperature. The convolutions' last inputs and the previous token's values travel in
    the decoding state."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__(shape)  # q, k, v down-projections (qk_dim = head_dim here)
        h, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
        channels = (h + hkv) * d
        self.conv_depthwise = CausalConv1d(channels, 2, groups=channels)
        self.conv_heads = CausalConv1d(channels, 2, groups=h + hkv)
        self.key_temperature = nn.Parameter(torch.ones(hkv))

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, keep, state = call.x, call.key_mask, call.state
        b, length, _ = x.shape
        h, hkv, d = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        q, k, v = self.q(x), self.k(x), self.v(x)
        past = (lambda name: state.get(name)) if state is not None else (lambda name: None)
        qk = torch.cat([q, k], -1)
        mixed, hist1 = self.conv_depthwise(qk, keep, past("conv_depthwise"))
        mixed, hist2 = self.conv_heads(mixed, keep, past("conv_heads"))
        cq, ck = mixed.split([h * d, hkv * d], -1)
        q0, k0 = q.view(b, length, h, d), k.view(b, length, hkv, d)
        groups = h // hkv
        q4 = cq.view(b, length, h, d) + (q0 + k0.repeat_interleave(groups, 2)) / 2
        k4 = ck.view(b, length, hkv, d) + (q0.view(b, length, hkv, groups, d).mean(3) + k0) / 2
        # value shift: the second half of each head's channels from the previous token
        v_in = v if keep is None else v * keep[..., None].to(v.dtype)
        prev = past("value")
        prev = v_in.new_zeros(b, 1, v.shape[-1]) if prev is None else prev.to(v.dtype)
        shifted = torch.cat([prev, v_in[:, :-1]], 1).view(b, length, hkv, d)
        v4 = v.view(b, length, hkv, d)
        half = d // 2
        v4 = torch.cat([v4[..., :d - half], shifted[..., d - half:]], -1)
        if state is not None:
            state.put(conv_depthwise=hist1, conv_heads=hist2, value=v_in[:, -1:])
        norm = math.sqrt(d)
        q4 = F.normalize(q4, dim=-1) * norm
        k4 = F.normalize(k4, dim=-1) * norm * self.key_temperature.to(k4.dtype)[:, None]
        return q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)
