"""Helpers for mechanisms that work on the spatial layout of their tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def grid_of(length: int, spatial: tuple[int, ...] | None) -> tuple[int, int]:
    """The 2-D grid of the tokens: the image's (H, W), or (1, L) for a sequence or video."""
    if spatial is not None and len(spatial) == 2:
        return spatial
    return 1, length


def masked_pool(x: Tensor, keep: Tensor | None, grid: tuple[int, int],
                out: tuple[int, int]) -> Tensor:
    """Adaptive average pooling of (B, H, L, D) tokens on their grid to ``out`` cells, over
    real tokens only (``keep`` (B, L)); a cell without real tokens pools to 0."""
    b, h, _, d = x.shape
    img = x.transpose(-1, -2).reshape(b, h * d, *grid)
    if keep is None:
        return F.adaptive_avg_pool2d(img, out).reshape(b, h, d, -1).transpose(-1, -2)
    w = keep.to(x.dtype).view(b, 1, *grid)
    num = F.adaptive_avg_pool2d(img.masked_fill(w == 0, 0), out)  # (not img * w: inf x 0)
    den = F.adaptive_avg_pool2d(w, out)
    pooled = num / den.masked_fill(den == 0, 1.0)  # (num is 0 there; 1e-12 is 0 in fp16)
    return pooled.reshape(b, h, d, -1).transpose(-1, -2)


class DepthwiseConv(nn.Module):
    """A k x k depthwise convolution over the token grid (a sequence is a 1 x L grid, which
    uses the kernel's middle row). Padded tokens are zeroed first, so they cannot leak."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)

    def forward(self, x: Tensor, grid: tuple[int, int], keep: Tensor | None) -> Tensor:
        """x (B, L, C) -> (B, L, C)."""
        if keep is not None:
            x = x.masked_fill(~keep.unsqueeze(-1), 0)  # (not x * keep: inf x 0 is NaN)
        img = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
        return self.conv(img).flatten(2).transpose(1, 2)
