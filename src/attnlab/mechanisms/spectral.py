"""Spectral gating token mixer (SpectFormer's spectral layer)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import ValueProjection
from attnlab.modules.spatial import grid_of
from attnlab.ops.spectral import spectral_gating


@register("spectral", family="local",
          paper="SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n log n d", weights=False, cross=False,
          unsupported=("kv_heads", "qk_norm", "rope"), variants=({"grid_size": (3, 5)},))
class SpectralGating(Attention):
    """Token mixing by a learnable global filter in the 2-D Fourier domain.

    "SpectFormer: Frequency and Attention is what you need in a Vision Transformer"
    (Patro et al., 2023), spectral layer after GFNet: X -> rfft2 -> X_f * W -> irfft2
    (orthonormal), W a learnable complex filter per channel, i.e. a circular convolution of
    every channel over the token grid; SpectFormer uses it in the first blocks and attention
    after. Here the filter acts on the value projection and is followed by the output
    projection, so the hooks and head_scale of the contract apply (heads = channel groups);
    there are no queries or keys (hook_q / hook_k are empty, width 0). The filter is kept at
    ``grid_size`` (H, W) and resized to other grids (GFNet's rule). Padded tokens are zeroed
    before the FFT. A sequence is a 1 x L grid.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "grid_size": Arg("ints", low=1, length=2),
    }

    def __init__(self, dim: int, heads: int, *, grid_size: tuple[int, int] = (14, 14),
                 **kwargs) -> None:
        super().__init__(dim, heads, projection=ValueProjection, **kwargs)
        channels = self.heads * self.head_dim
        h, w = grid_size
        self.grid_size = (h, w)
        self.filter_real = nn.Parameter(torch.randn(h, w // 2 + 1, channels) * 0.02)
        self.filter_imag = nn.Parameter(torch.randn(h, w // 2 + 1, channels) * 0.02)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        b, h, length, d = v.shape
        if call.key_mask is not None:
            v = v * call.key_mask[:, None, :, None].to(v.dtype)
        grid = grid_of(length, call.spatial)
        img = v.permute(0, 2, 1, 3).reshape(b, *grid, h * d)
        out = spectral_gating(img, self.filter_real, self.filter_imag)
        return out.reshape(b, length, h, d).permute(0, 2, 1, 3)
