"""MEDUSA-style multi-scale heads: one attention body, heads reading different scales."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.spatial import grid_of
from attnlab.ops.common import at_least_float32
from attnlab.ops.softmax import softmax_attention, softmax_weights


def pooling_matrix(grid: tuple[int, int], factor: int, keep: Tensor | None, batch: int,
                   device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, L_pooled, L) in ``dtype``: average of the real tokens in each factor x factor cell
    (1 x factor for a 1 x L grid); a cell without real tokens is all zero. Built in the
    inputs' dtype (a float32 matrix rounded 1/3 and 1/9 to 2e-8 in a float64 model)."""
    h, w = grid
    fh, fw = (min(factor, h), min(factor, w)) if h > 1 else (1, min(factor, w))
    r = torch.arange(h, device=device)[:, None] // fh
    c = torch.arange(w, device=device)[None, :] // fw
    cols = -(-w // fw)
    cell = (r * cols + c).reshape(-1)  # (L,)
    n_cells = -(-h // fh) * cols  # the largest cell + 1, from the grid (no host sync)
    member = (torch.arange(n_cells, device=device)[:, None] == cell[None, :]).to(dtype)
    member = member.expand(batch, -1, -1)
    if keep is not None:
        member = member * keep[:, None, :].to(dtype)
    return member / member.sum(-1, keepdim=True).clamp_min(1)


@register("medusa", family="head-mixing",
          paper="MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network "
                "Architecture for Medical Image Analysis", causal=False, bidirectional=True,
          decode=False, domains=("image", "seq"), complexity="n^2 d / s^2", weights=True,
          cross=False, variants=({"scales": (1, 2)}, {"scales": (1, 3, 1, 3)}))
class MultiScaleHeadAttention(Attention):
    """One self-attention body whose heads look at the image at different scales.

    "MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for
    Medical Image Analysis" (Aboutalebi et al., 2021) feeds the heads of a single attention
    body into different scales of a network ("single body, multi-scale heads"). As a module:
    head h attends from every token to keys and values average-pooled over s_h x s_h cells
    (``scales``, one factor per head, cycled; 1 = full resolution): O_h = softmax(c Q_h
    (P_s K_h)^T) P_s V_h, so its implied matrix is softmax(..) P_s. The scales stand in for
    the paper's encoder-decoder levels; the CNN around it is not part of this module.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "scales": Arg("ints", low=1),
    }

    def __init__(self, dim: int, heads: int, *, scales: tuple[int, ...] = (1, 2, 4),
                 **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.scales = tuple(int(scales[i % len(scales)]) for i in range(heads))

    def _groups(self):
        for s in sorted(set(self.scales)):
            yield s, [h for h, hs in enumerate(self.scales) if hs == s]

    def _pooling(self, s: int, q: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        """The (B, cells, L) pooling matrix of scale s and which cells hold real tokens."""
        grid = grid_of(q.shape[2], call.spatial)
        pool = pooling_matrix(grid, s, call.key_mask, q.shape[0], q.device,
                              torch.promote_types(q.dtype, torch.float32))
        return pool, pool.sum(-1) > 0

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        k, v = self.expand_kv(k), self.expand_kv(v)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for s, heads in self._groups():
            pool, keys = self._pooling(s, q, call)
            pool = pool[:, None].to(k.dtype)
            out[:, heads] = softmax_attention(q[:, heads], pool @ k[:, heads],
                                              pool @ v[:, heads], mask=keys[:, None, None, :])
        return out

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        k = self.expand_kv(k)
        w = at_least_float32(q.new_zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        for s, heads in self._groups():
            pool, keys = self._pooling(s, q, call)
            pk = pool[:, None].to(k.dtype) @ k[:, heads]
            a = softmax_weights(q[:, heads], pk, mask=keys[:, None, None, :])
            w[:, heads] = a @ pool[:, None].to(a.dtype)
        return w
