"""Memory-bounded row-tiled attention for mechanisms whose weights are a row-local function.

For ``out = W(q, k) @ v`` where each row of ``W`` depends only on its own query and the keys
(sigmoid, softplus, LSSAR, softmax, ...), the output is computed one block of query rows at a
time. The backward recomputes each block (activation checkpointing per block), so training
never holds more than ``block x Lk`` scores per head: memory grows linearly in L.
Causal blocks only touch the keys they can see.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlab.core.masks import causal_visibility

# Scores held per block: about this many elements (B * H * block * Lk).
TILE_ELEMENTS = 1 << 23

WeightsFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def auto_block_size(batch_heads: int, lk: int) -> int:
    """Rows per block so that one block of scores stays near ``TILE_ELEMENTS`` elements."""
    rows = TILE_ELEMENTS // max(1, batch_heads * lk)
    return int(min(1024, max(16, rows)))


def _block_visibility(i0: int, i1: int, kend: int, lq: int, lk: int, causal: bool,
                      mask: Tensor | None, device: torch.device) -> Tensor | None:
    vis = None
    if causal:
        vis = causal_visibility(i1 - i0, lk, device, q_start=i0, q_total=lq, k_end=kend)
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[..., i0:i1, :]
        m = m[..., :kend]
        vis = m if vis is None else (m & vis)
    return vis


def _block(weights_fn: WeightsFn, q: Tensor, k: Tensor, v: Tensor, vis: Tensor | None) -> Tensor:
    return weights_fn(q, k, vis).to(v.dtype) @ v


def row_tiled(weights_fn: WeightsFn, q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
              mask: Tensor | None, block_size: int | None = None) -> Tensor:
    """``weights_fn(q_block, k_visible, visibility) @ v`` over blocks of query rows.

    ``q`` (B, H, Lq, D), ``k`` and ``v`` (B, H, Lk, D) with heads already expanded;
    ``mask`` broadcastable to (B, H, Lq, Lk); causal aligns queries to the end of the keys.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    size = block_size or auto_block_size(b * h, lk)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for i0 in range(0, lq, size):
        i1 = min(lq, i0 + size)
        kend = min(lk, i1 + lk - lq) if causal else lk
        if kend <= 0:  # rows that see no key at all
            outs.append(v.new_zeros(b, h, i1 - i0, v.shape[-1]))
            continue
        vis = _block_visibility(i0, i1, kend, lq, lk, causal, mask, q.device)
        args = (weights_fn, q[:, :, i0:i1], k[:, :, :kend], v[:, :, :kend], vis)
        outs.append(checkpoint(_block, *args, use_reentrant=False) if grad else _block(*args))
    return torch.cat(outs, dim=2)
