"""Gaussian Adaptive Attention (GAAM): Gaussian-density re-weighting of the tokens."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import ValueProjection
from attnlab.ops.common import at_least_float32


def gaussian_weights(x: Tensor, offset: Tensor, scale: Tensor, *, keep: Tensor | None = None,
                     eps: float = 1e-8, correction: int = 1) -> Tensor:
    """GAAM weights over the token axis of x (B, H, L, D), normalised to sum 1 per channel.

    mu, var: per (B, H, channel) over the real tokens, var with Bessel's ``correction``
    (sum of squares / (N - correction), as ``torch.var``; 1 as the official, 0 divides by N;
    a single token has var 0); y_g = (x - mu - delta_g) / sqrt(var + eps);
    M = prod_g exp(-y_g^2 / (2 c_g^2)); ``offset`` delta and ``scale`` c are (H, G). Padded
    tokens get weight 0.
    """
    x = at_least_float32(x)
    w = torch.ones_like(x[..., :1]) if keep is None else keep[:, None, :, None].to(x.dtype)
    count = w.sum(2, keepdim=True)
    mu = (x * w).sum(2, keepdim=True) / count.clamp_min(1)
    var = ((x - mu).square() * w).sum(2, keepdim=True) / (count - correction).clamp_min(1)
    std = torch.sqrt(var + eps)
    delta = offset.to(x.dtype)[None, :, None, None, :]  # (1, H, 1, 1, G)
    c = scale.to(x.dtype)[None, :, None, None, :]
    y = ((x - mu)[..., None] - delta) / std[..., None]
    log_m = -(y.square() / (2 * c.square())).sum(-1)  # log of the product over the Gaussians
    if keep is not None:
        log_m = log_m.masked_fill(~keep[:, None, :, None], float("-inf"))
    m = torch.softmax(log_m, dim=2)  # normalised over the tokens
    return torch.nan_to_num(m, nan=0.0)


@register("gaam", family="head-mixing",
          paper="Gaussian Adaptive Attention is All You Need: Robust Contextual "
                "Representations Across Multiple Modalities", causal=False, bidirectional=True,
          decode=False, domains=("image", "seq"), complexity="n d G", weights=False,
          cross=False, unsupported=("kv_heads", "qk_norm", "rope"),
          variants=({"gaussians": 1},))
class GaussianAdaptiveAttention(Attention):
    """Per head (channel chunk), G learnable Gaussians re-weight each token's channels.

    "Gaussian Adaptive Attention is All You Need" (Ioannides et al., 2024): over the token
    axis, mu and var per channel; y_g = (x - mu - delta_g) / sqrt(var + eps) with a learnable
    offset delta_g and scale c_g per head and Gaussian; M = prod_g exp(-y_g^2 / (2 c_g^2))
    normalised to sum 1 over the tokens; out = x * M. Here x is the value projection and the
    output projection follows (the residual is the block's). As the official code: var is
    the unbiased variance (N - 1; ``unbiased=False`` divides by N, attnlab's earlier
    default), eps = 1e-8 (the official value: its multi-head wrapper passes eps to the wrong
    argument, so its heads always use 1e-8; here ``eps`` reaches them), c_g starts at
    exp(N(0, 1)) (``random_scale=False``: at 1, attnlab's earlier init). The weights sum to
    1 over the tokens, are invariant to x -> a x + b (a > 0) with delta = 0, and become
    uniform as c -> inf. There is no token-to-token matrix, so hook_q / hook_k are empty
    (width 0) and ``weights()`` is undefined.

    Official code (gioannides/Gaussian-Adaptive-Attention @ 145d1bc,
    gaussian_adaptive_attention/GaussianBlock.py ``GaussianAdaptiveAttention``, one per head
    on the head's channels over the tokens): equal to 1e-15 of scale in float64, output,
    input and parameter gradients (tests/parity/test_gaam.py). The official multi-head
    wrapper splits the normalised (token) axis into heads; attnlab splits channels
    (docs/mechanisms/gaam.md).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "gaussians": Arg("int", low=1),
        "eps": Arg("float", low=0),
        "unbiased": Arg("bool"),
        "random_scale": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, gaussians: int = 4, eps: float = 1e-8,
                 unbiased: bool = True, random_scale: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, projection=ValueProjection, **kwargs)
        self.eps, self.unbiased, self.random_scale = eps, unbiased, random_scale
        self.offset = nn.Parameter(torch.empty(heads, gaussians))
        self.scale = nn.Parameter(torch.empty(heads, gaussians))
        with torch.no_grad():
            self._reset_own()

    def _reset_own(self) -> None:
        self.offset.zero_()
        # the official c = exp(N(0, 1)) per head and Gaussian; 1 with random_scale=False
        if self.random_scale:
            self.scale.normal_().exp_()
        else:
            self.scale.fill_(1.0)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        m = gaussian_weights(v, self.offset, self.scale, keep=call.key_mask, eps=self.eps,
                             correction=1 if self.unbiased else 0)
        return v * m.to(v.dtype)
