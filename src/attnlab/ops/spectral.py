"""Spectral gating: a learnable filter applied in the 2-D Fourier domain (GFNet, SpectFormer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def spectral_gating(x: Tensor, filter_real: Tensor, filter_imag: Tensor) -> Tensor:
    """y = irfft2(rfft2(x) * W) with orthonormal FFTs, over the two spatial axes.

    ``x`` (B, H, W, C) real; ``filter_real`` / ``filter_imag`` (h, w, C) with the filter's
    own grid, resized (bilinear, per part) to the input's (H, W // 2 + 1) frequencies when
    they differ. Equals the circular convolution of each channel of x with irfft2(W).
    Computed in float32 at least; returns x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"spectral_gating: x must be (B, H, W, C), got {tuple(x.shape)}")
    if filter_real.shape != filter_imag.shape or filter_real.dim() != 3 or \
            filter_real.shape[-1] != x.shape[-1]:
        raise ValueError(f"spectral_gating: filters must be (h, w, C={x.shape[-1]}), got "
                         f"{tuple(filter_real.shape)} and {tuple(filter_imag.shape)}")
    h, w = x.shape[1], x.shape[2]
    freq = (h, w // 2 + 1)
    weight = torch.stack([filter_real, filter_imag])  # (2, h', w', C)
    if tuple(weight.shape[1:3]) != freq:
        weight = F.interpolate(weight.permute(0, 3, 1, 2), size=freq, mode="bilinear",
                               align_corners=True).permute(0, 2, 3, 1)
    work = torch.promote_types(x.dtype, torch.float32)
    spec = torch.fft.rfft2(x.to(work), dim=(1, 2), norm="ortho")
    spec = spec * torch.complex(weight[0].to(work), weight[1].to(work))
    return torch.fft.irfft2(spec, s=(h, w), dim=(1, 2), norm="ortho").to(x.dtype)
