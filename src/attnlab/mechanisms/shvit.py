"""Single-head attention of SHViT: attention on a part of the channels, the rest untouched."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import split_heads
from attnlab.ops.common import upcast
from attnlab.ops.softmax import softmax_attention, softmax_weights

NORM_EPS = 1e-5  # the official pre-norm: torch's GroupNorm default
BN_EPS = 1e-5  # BatchNorm2d's default, folded into the initial scale


class ScaledLinear(nn.Linear):
    """A 1 x 1 ``Conv2d_BN`` of SHViT in its inference form: y = s * (x W^T) + b.

    ``weight`` is the convolution's, ``scale`` s = gamma / sqrt(var + eps) and ``bias`` b =
    beta - s * mean hold its BatchNorm with the running statistics folded in; at
    initialisation (mean 0, var 1, beta 0) s = ``bn_weight`` / sqrt(1 + 1e-5) and b = 0.
    """

    def __init__(self, fan_in: int, out: int, *, bias: bool, bn_weight: float = 1.0) -> None:
        super().__init__(fan_in, out, bias=bias)
        self.bn_weight = bn_weight
        self.scale = nn.Parameter(torch.empty(out))
        self._init_bn()

    def _init_bn(self) -> None:
        with torch.no_grad():
            self.scale.fill_(self.bn_weight / math.sqrt(1.0 + BN_EPS))
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def reset_parameters(self) -> None:
        """nn.Linear's init of the weight (its draws), then the folded BatchNorm's s and b."""
        super().reset_parameters()
        if hasattr(self, "scale"):  # (nn.Linear.__init__ calls this before scale exists)
            self._init_bn()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale[:, None], self.bias)


class PartialGroupNorm(nn.Module):
    """GroupNorm(1, p) of the attended channels: one mean and variance per sequence over its
    real tokens and all p channels (``per_token``: over each token's p channels only, so
    that no token sees a later one), then a per-channel affine map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.per_token = False

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        (xf,) = upcast(x)  # statistics in float32 at least
        if self.per_token:
            mean = xf.mean(-1, keepdim=True)
            var = (xf - mean).pow(2).mean(-1, keepdim=True)
        else:
            mean, var = _sequence_moments(xf, keep)
        y = ((xf - mean) * torch.rsqrt(var + NORM_EPS)).to(x.dtype)
        return y * self.weight.to(x.dtype) + self.bias.to(x.dtype)


def _sequence_moments(x: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (B, 1, 1) of x (B, L, p) over the real tokens and channels."""
    if keep is None:
        mean = x.mean((1, 2), keepdim=True)
        return mean, (x - mean).pow(2).mean((1, 2), keepdim=True)
    pad = ~keep[..., None]
    count = (keep.sum(1).to(x.dtype) * x.shape[-1]).clamp_min(1.0).view(-1, 1, 1)
    mean = x.masked_fill(pad, 0).sum((1, 2), keepdim=True) / count
    dev = (x - mean).masked_fill(pad, 0)  # (masked_fill, not x * keep: a huge padded token)
    return mean, dev.pow(2).sum((1, 2), keepdim=True) / count


class PartialProjection(nn.Module):
    """q, k, v of SHSA: the first ``channels`` channels, GroupNorm(1, p) (``pre_norm``), then
    one folded ``Conv2d_BN`` each (the official fused ``qkv`` split as q | k | v)."""

    def __init__(self, shape: HeadShape, *, channels: int, pre_norm: bool) -> None:
        super().__init__()
        self.shape, self.channels = shape, channels
        self.norm = PartialGroupNorm(channels) if pre_norm else None
        self.q = ScaledLinear(channels, shape.heads * shape.qk_dim, bias=shape.bias)
        self.k = ScaledLinear(channels, shape.kv_heads * shape.qk_dim, bias=shape.bias)
        self.v = ScaledLinear(channels, shape.kv_heads * shape.head_dim, bias=shape.bias)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x = call.x[..., :self.channels]
        if self.norm is not None:
            x = self.norm(x, call.key_mask)
        s = self.shape
        return (split_heads(self.q(x), s.heads), split_heads(self.k(x), s.kv_heads),
                split_heads(self.v(x), s.kv_heads))


@register("shvit", family="scored",
          paper="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design",
          causal=True, bidirectional=True, decode=True, domains=("image", "seq"),
          complexity="n^2 d_qk", weights=True, cross=False,
          variants=({"partial": 0.5, "qk_dim": 4, "pre_norm": False, "bias": False},))
class SingleHeadAttention(Attention):
    """Attention on the first ``partial`` of the channels; the other channels pass untouched.

    "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (Yun & Ro,
    CVPR 2024; official module ``SHSA`` of ysj9909/SHViT). Split x = [x_p, x_r] with x_p the
    first p = ``partial`` * C channels; n = GroupNorm(1, p)(x_p) (one mean and variance per
    image over its real tokens and the p channels, ``pre_norm``);

        A = softmax(c (n W_q)(n W_k)^T),  out = W_o ReLU([A n W_v, x_r]),

    q, k of width ``qk_dim`` = 16, c = qk_dim^-1/2. Each W is a 1 x 1 convolution with
    BatchNorm (``Conv2d_BN``) in its inference form, a linear map with a per-channel scale
    and a bias (``bias``, the BatchNorm shift); the output one's scale starts at 0, as the
    official BatchNorm weight, so the module's output is 0 at initialisation. Causal: the
    pre-norm's statistics are each token's own (over its p channels). The paper uses one head
    (``heads=1``); with more heads the p channels are split between them (q, k keep
    ``qk_dim`` per head). ``hook_heads`` holds the attention part, (B, L, H, p / H).
    """

    backends = ("auto", "reference", "sdpa", "flex")

    arguments: ClassVar[dict[str, Arg]] = {
        "partial": Arg("float", low=0, low_open=True, high=1),
        "qk_dim": Arg("int", low=1),
        "pre_norm": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, partial: float = 0.25, qk_dim: int = 16,
                 pre_norm: bool = True, **kwargs) -> None:
        channels = max(heads, round(dim * partial / heads) * heads)
        if "head_dim" in kwargs:
            raise ValueError("shvit: the head width is partial * dim / heads; pass partial")
        bias = kwargs.pop("bias", True)  # the BatchNorm shifts of the official Conv2d_BN

        def projection(shape: HeadShape) -> PartialProjection:
            return PartialProjection(shape, channels=channels, pre_norm=pre_norm)

        # the output projection comes after the concatenation with the other channels (post)
        super().__init__(dim, heads, head_dim=channels // heads, qk_dim=qk_dim, bias=bias,
                         projection=projection, output_projection=False, **kwargs)
        norm: Any = self.qkv.norm
        if norm is not None:
            norm.per_token = self.causal
        self.partial_channels = channels
        self.proj = ScaledLinear(dim, dim, bias=bias, bn_weight=0.0)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return softmax_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                 backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return softmax_weights(q, k, causal=self.causal, mask=call.op_mask)

    def post(self, y: Tensor, call: Call) -> Tensor:
        rest = call.x[..., self.partial_channels:]
        return self.proj(torch.relu(torch.cat([y, rest.to(y.dtype)], -1)))
