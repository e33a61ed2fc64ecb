"""Compressed Convolutional Attention (CCA / CCGQA): attention inside a compressed latent."""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.causal_conv import CausalConv1d
from attnlab.modules.projections import QKVProjection
from attnlab.modules.reset import reset_children
from attnlab.modules.rotary import Rotary
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
    (depthwise, kernel 2, then grouped per head, kernel 2; the second sees the first's output
    on the zero padding before t = 0, its bias) and get the qk-mean residual back
    (q += (q + repeat(k)) / 2, k += (mean_group(q) + k) / 2, with the pre-convolution q, k);
    value shift: the first half of the value projection's kv_heads * d_h channels is the
    current token's, the second half the previous token's (with kv_heads >= 2 whole heads,
    half of each with one kv head); q, k are L2-normalised to norm sqrt(d_h), k times a learned
    per-kv-head temperature (initialised to 0); RoPE on the first half of each head's
    channels (``rope_fraction``, base ``rope_base`` = 5e6; ``rope=None``, the default, turns it
    on whenever d_h >= 2); softmax attention runs in the latent
    heads and the output projection goes back up. Decoding keeps the latent KV cache
    (2 * kv_heads * d_h numbers per token) plus the convolutions' last inputs and the previous
    token's value projection.

    Official code: Zyphra/transformers @ ff3f2ee (branch zaya1), models/zaya/modeling_zaya.py
    ``ZayaCCAProjection`` + ``ZayaQKNorm`` + ``ZayaAttention``: equal to 1e-15 of scale in
    float64 (tests/parity/test_cca.py); remaining differences on docs/mechanisms/cca.md.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "compression": Arg("int", low=1),
        "head_dim": Arg("int", optional=True, low=1),
        "rope": Arg("bool", optional=True),
        "rope_base": Arg("float", low=0, low_open=True),
        "rope_fraction": Arg("float", low=0, low_open=True, high=1),
    }

    def __init__(self, dim: int, heads: int, *, compression: int = 2,
                 head_dim: int | None = None, rope: bool | None = None,
                 rope_base: float = 5_000_000.0, rope_fraction: float = 0.5,
                 **kwargs) -> None:
        head_dim = max(1, dim // (heads * compression)) if head_dim is None else head_dim
        # the official always rotates; None: on unless a latent head of one channel has no
        # pair to rotate
        rope = head_dim >= 2 if rope is None else rope
        rotary_dim = int(head_dim * rope_fraction)  # as the official's partial_rotary_factor
        if rope and (rotary_dim < 1 or 2 * ((rotary_dim + 1) // 2) > head_dim):
            raise ValueError(f"cca: rope needs head_dim * rope_fraction >= 1 channels that "
                             f"fit the head, got "
                             f"head_dim={head_dim}, rope_fraction={rope_fraction}")
        super().__init__(dim, heads, head_dim=head_dim, projection=CompressedConvProjection,
                         rope=rope, rope_base=rope_base,
                         rotary=partial(Rotary, rotary_dim=rotary_dim, float32_frequencies=True),
                         **kwargs)
        self.compression, self.rope_fraction = compression, rope_fraction

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return softmax_attention(q, k, v, causal=True, mask=call.op_mask)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return softmax_weights(q, k, causal=self.causal, mask=call.op_mask)


class CompressedConvProjection(QKVProjection):
    """CCA's q, k, v: down-projections to the latent heads, two causal convolutions over
    [q; k] with the qk-mean residual, the value shift, and the L2 norm with a learned key
    temperature. The convolutions' last inputs and the previous token's values travel in
    the decoding state. Padded tokens are zeroed before the projections (as the official)."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__(shape)  # q, k, v down-projections (qk_dim = head_dim here)
        h, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
        channels = (h + hkv) * d
        self.conv_depthwise = CausalConv1d(channels, 2, groups=channels)
        self.conv_heads = CausalConv1d(channels, 2, groups=h + hkv)
        self.key_temperature = nn.Parameter(torch.zeros(hkv))

    def reset_parameters(self) -> None:
        """q, k, v and the two convolutions as built, the key temperature 0."""
        reset_children(self)
        with torch.no_grad():
            self.key_temperature.zero_()

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, keep, state = call.x, call.key_mask, call.state
        b, length, _ = x.shape
        h, hkv, d = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        q, k, v = self.q(x), self.k(x), self.v(x)
        past = (lambda name: state.get(name)) if state is not None else (lambda name: None)
        mixed, hist1 = self.conv_depthwise(torch.cat([q, k], -1), None, past("conv_depthwise"))
        hist2 = past("conv_heads")
        if hist2 is None:  # before t = 0 the first conv saw zeros: its output there is its bias
            hist2 = cast(Tensor, self.conv_depthwise.conv.bias).to(mixed.dtype).expand(b, 1, -1)
        mixed, hist2 = self.conv_heads(mixed, None, hist2)
        cq, ck = mixed.split([h * d, hkv * d], -1)
        q0, k0 = q.view(b, length, h, d), k.view(b, length, hkv, d)
        groups = h // hkv
        q4 = cq.view(b, length, h, d) + (q0 + k0.repeat_interleave(groups, 2)) / 2
        k4 = ck.view(b, length, hkv, d) + (q0.view(b, length, hkv, groups, d).mean(3) + k0) / 2
        # value shift: the last half of the kv_heads * d value channels from the previous
        # token (before t = 0: the projection of a zero token, its bias)
        prev = past("value")
        if prev is None:
            prev = self.v(x.new_zeros(b, 1, x.shape[-1]))
        shifted = torch.cat([prev.to(v.dtype), v[:, :-1]], 1)
        current = v.shape[-1] - v.shape[-1] // 2
        v4 = torch.cat([v[..., :current], shifted[..., current:]], -1).view(b, length, hkv, d)
        if state is not None:
            state.put(conv_depthwise=hist1, conv_heads=hist2, value=v[:, -1:])
        q4 = l2_scaled(q4, math.sqrt(d))
        k4 = l2_scaled(k4, math.sqrt(d)) * self.key_temperature.to(k4.dtype)[:, None]
        return q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)


def l2_scaled(t: Tensor, norm: float) -> Tensor:
    """``t`` rescaled to L2 norm ``norm`` over its last dim, the norm clamped at the dtype's
    eps (as the official ZayaQKNorm)."""
    return t * (norm / t.norm(p=2, dim=-1, keepdim=True).clamp_min(torch.finfo(t.dtype).eps))
