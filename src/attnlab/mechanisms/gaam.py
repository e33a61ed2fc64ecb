"""Gaussian Adaptive Attention (GAAM): Gaussian-density re-weighting of the tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import ValueProjection
from attnlab.ops.common import at_least_float32


def gaussian_weights(x: Tensor, offset: Tensor, scale: Tensor, *, keep: Tensor | None = None,
                     eps: float = 1e-5) -> Tensor:
    """GAAM weights over the token axis of x (B, H, L, D), normalised to sum 1 per channel.

    mu, var: per (B, H, channel) over the real tokens; y_g = (x - mu - delta_g) /
    sqrt(var + eps); M = prod_g exp(-y_g^2 / (2 c_g^2)); ``offset`` delta and ``scale`` c are
    (H, G). Padded tokens get weight 0.
    """
    x = at_least_float32(x)
    w = torch.ones_like(x[..., :1]) if keep is None else keep[:, None, :, None].to(x.dtype)
    count = w.sum(2, keepdim=True).clamp_min(1)
    mu = (x * w).sum(2, keepdim=True) / count
    var = ((x - mu).square() * w).sum(2, keepdim=True) / count
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
    output projection follows (the residual is the block's). eps sits under the square
    root, where it belongs (the official multi-head wrapper passes it to the wrong
    argument). The weights sum to 1 over the tokens, are invariant to x -> a x + b (a > 0)
    with delta = 0, and become uniform as c -> inf. There is no token-to-token matrix, so
    hook_q / hook_k are empty (width 0) and ``weights()`` is undefined.
    """

    def __init__(self, dim: int, heads: int, *, gaussians: int = 4, eps: float = 1e-5,
                 **kwargs) -> None:
        super().__init__(dim, heads, projection=ValueProjection, **kwargs)
        if gaussians < 1:
            raise ValueError(f"gaam: gaussians must be >= 1, got {gaussians}")
        self.eps = eps
        self.offset = nn.Parameter(torch.zeros(heads, gaussians))
        self.scale = nn.Parameter(torch.ones(heads, gaussians))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        m = gaussian_weights(v, self.offset, self.scale, keep=call.key_mask, eps=self.eps)
        return v * m.to(v.dtype)
