"""Sparsifiner: a low-rank connectivity predictor picks the keys each query attends to."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnlab.core.call import Call
from attnlab.core.masks import top_keys
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.softmax import softmax_attention, softmax_weights


@register("sparsifiner", family="sparse",
          paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient "
                "Vision Transformers", causal=True, bidirectional=True, decode=False,
          domains=("image", "seq"), complexity="n^2 r + n k d", weights=True, cross=False,
          variants=({"keep": 1.0}, {"keep": 0.5, "rank": 4}))
class SparsifinerAttention(Attention):
    """Instance-dependent sparse attention from a learned low-rank connectivity predictor.

    "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
    Transformers" (Wei et al., 2023): a light predictor scores every token pair,
    C = (x W_a)(x W_b)^T / sqrt(r) per head with rank r = ``rank``; each query keeps its
    k = ceil(``keep`` * n) visible keys of highest C (the binarised connectivity mask M) and
    O = softmax(c Q K^T restricted to M) V. The predictor is trained by distillation,
    ``extra_loss()`` = ``distill_weight`` * KL(dense attention (detached) || softmax(C)),
    computed in training mode only. ``keep=1`` is dense attention.
    """

    def __init__(self, dim: int, heads: int, *, keep: float = 0.25, rank: int = 16,
                 distill_weight: float = 1.0, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"sparsifiner: keep must be in (0, 1], got {keep}")
        if rank < 1:
            raise ValueError(f"sparsifiner: rank must be >= 1, got {rank}")
        self.keep, self.rank, self.distill_weight = keep, rank, distill_weight
        self.conn_a = nn.Linear(dim, heads * rank, bias=False)
        self.conn_b = nn.Linear(dim, heads * rank, bias=False)

    def connectivity(self, call: Call) -> Tensor:
        """Predicted connectivity scores C (B, H, L, L)."""
        a = self.split_heads(self.conn_a(call.x), self.heads)
        b = self.split_heads(self.conn_b(call.x), self.heads)
        return (a @ b.transpose(-1, -2)) / math.sqrt(self.rank)

    def _mask(self, q: Tensor, k: Tensor, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        vis = self.visibility(q, k, call)
        if vis is None:
            vis = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
        vis = vis.expand(q.shape[0], self.heads, q.shape[2], k.shape[2])
        scores = self.connectivity(call)
        count = min(k.shape[2], math.ceil(self.keep * k.shape[2]))
        return top_keys(scores.detach(), vis, count), scores, vis

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        keep, scores, vis = self._mask(q, k, call)
        if self.training and self.distill_weight > 0:
            dense = softmax_weights(q.detach(), k.detach(), mask=vis)
            log_pred = torch.log_softmax(scores.float().masked_fill(~vis, -1e9), dim=-1)
            kl = (dense * (torch.log(dense.clamp_min(1e-12)) - log_pred)).sum(-1)
            rows = vis.any(-1)
            self._extra_loss = self.distill_weight * kl[rows].mean() if rows.any() else \
                kl.sum() * 0
        return softmax_attention(q, k, v, mask=keep)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        keep, _, _ = self._mask(q, k, call)
        return softmax_weights(q, k, mask=keep)
