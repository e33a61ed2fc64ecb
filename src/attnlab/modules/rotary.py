"""Rotary position embedding (RoPE, "RoFormer"), applied to (B, H, L, D) tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    """Rotates pairs of channels by position-dependent angles: q_m -> R(m theta) q_m.

    Uses the half-split pairing (channel i with channel i + D/2). ``positions`` are absolute
    token positions, so a decoding step continues exactly where the prefill stopped.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (L, D/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class NoRotation(nn.Module):
    """The rotary slot of a module without ``rope=``: positions change nothing."""

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return x
