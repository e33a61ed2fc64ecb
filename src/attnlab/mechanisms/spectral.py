"""Spectral gating token mixer (SpectFormer's spectral layer)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import ValueProjection, empty_like_heads, split_heads
from attnlab.modules.spatial import grid_of
from attnlab.ops.spectral import spectral_gating


class InputValues(nn.Module):
    """No value projection: v is the input itself, split into heads (SpectFormer's filter
    acts on the normalised tokens); q and k are empty ``(B, H, L, 0)`` tensors."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        empty = empty_like_heads(call.x, self.shape.heads)
        return empty, empty, split_heads(call.x, self.shape.kv_heads)


@register("spectral", family="local",
          paper="SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n log n d", weights=False, cross=False,
          unsupported=("kv_heads", "qk_norm", "rope"),
          variants=({"grid_size": (3, 5)}, {"projections": True}))
class SpectralGating(Attention):
    """Token mixing by a learnable global filter in the 2-D Fourier domain.

    "SpectFormer: Frequency and Attention is what you need in a Vision Transformer"
    (Patro et al., 2023), spectral layer after GFNet:

        Y = irfft2(rfft2(X) * W)   (orthonormal FFTs over the (H, W) token grid)

    W a learnable complex filter (H, W/2 + 1, C), one per channel, i.e. a circular
    convolution of every channel over the token grid; SpectFormer uses it in the first
    blocks and attention after. By default (``projections=False``, as the official
    ``SpectralGatingNetwork``) X is the module input and Y its output: there are no
    projections, so ``heads * head_dim`` must equal ``dim`` (heads are channel groups for
    the hooks and head_scale). ``projections=True`` puts a value projection before the
    filter and an output projection after it (attnlab's formulation before issue 40).
    There are no queries or keys (hook_q / hook_k are empty, width 0). The filter is kept
    at ``grid_size`` (H, W) and resized to other grids (GFNet's rule). Padded tokens are
    zeroed before the FFT. A sequence is a 1 x L grid.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "grid_size": Arg("ints", low=1, length=2),
        "projections": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, grid_size: tuple[int, int] = (14, 14),
                 projections: bool = False, **kwargs) -> None:
        kwargs.setdefault("output_projection", projections)
        super().__init__(dim, heads, projection=ValueProjection if projections else InputValues,
                         **kwargs)
        channels = self.heads * self.head_dim
        if not projections and channels != dim:
            raise ValueError(f"spectral: without projections the filter acts on the input, so "
                             f"heads * head_dim ({channels}) must equal dim ({dim}); pass "
                             "projections=True for another width")
        self.projections = projections
        h, w = grid_size
        self.grid_size = (h, w)
        self.filter_real = nn.Parameter(torch.empty(h, w // 2 + 1, channels))
        self.filter_imag = nn.Parameter(torch.empty(h, w // 2 + 1, channels))
        with torch.no_grad():
            self._reset_own()

    def _reset_own(self) -> None:
        self.filter_real.normal_().mul_(0.02)  # the official N(0, 0.02^2) filters
        self.filter_imag.normal_().mul_(0.02)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        b, h, length, d = v.shape
        if call.key_mask is not None:
            v = v * call.key_mask[:, None, :, None].to(v.dtype)
        grid = grid_of(length, call.spatial)
        img = v.permute(0, 2, 1, 3).reshape(b, *grid, h * d)
        out = spectral_gating(img, self.filter_real, self.filter_imag)
        return out.reshape(b, length, h, d).permute(0, 2, 1, 3)
