"""Causal convolution over time that carries its history between decoding calls."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CausalConv1d(nn.Module):
    """y_t = sum_{s < kernel} w_s x_{t - s} per channel group (``groups`` = channels is
    depthwise). Padded tokens are zeroed first, so they cannot leak into real ones; the
    last ``kernel - 1`` inputs are returned as the history for the next call."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=groups)

    def forward(self, x: Tensor, keep: Tensor | None = None, history: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """x (B, L, C), keep (B, L) bool, history (B, kernel - 1, C) -> (y (B, L, C), history)."""
        if keep is not None:  # padded inputs are 0, whatever they hold (inf x 0 is NaN)
            x = x.masked_fill(~keep.unsqueeze(-1), 0)
        if history is None:
            history = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[-1])
        full = torch.cat([history.to(x.dtype), x], 1)
        y = self.conv(full.transpose(1, 2)).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.kernel - 1):]
