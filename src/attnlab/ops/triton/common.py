"""What several Triton kernels share: the visibility tile of the score kernels (sigmoid,
softplus), head-dim padding, and a bool mask read through its strides."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def visible(qi, kj, Lq, Lk, off, mask_base, smm, smn,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Bool tile: query ``qi`` may see key ``kj`` (index tiles that broadcast together)."""
    vis = (qi < Lq) & (kj < Lk)
    if CAUSAL:
        vis = vis & (kj <= qi + off)
    if HAS_MASK:
        keep = tl.load(mask_base + qi * smm + kj * smn, mask=vis, other=0)
        vis = vis & (keep != 0)
    return vis


def padded(n: int) -> int:
    """A head dim padded to a power of two >= 16 (``tl.dot``'s least block side)."""
    return max(16, triton.next_power_of_2(n))


def mask_strides(mask: Tensor | None, shape: tuple[int, int, int, int]
                 ) -> tuple[Tensor | None, tuple[int, ...]]:
    """The bool mask as uint8 (a view, no copy) broadcast to (B, H, Lq, Lk) by strides."""
    if mask is None:
        return None, (0, 0, 0, 0)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).view(torch.uint8)
    m = m.expand(shape)
    return m, tuple(m.stride())
