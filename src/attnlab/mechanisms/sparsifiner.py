"""Sparsifiner: a low-rank connectivity predictor picks the keys each query attends to."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.masks import top_keys
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.softmax import softmax_attention, softmax_weights
from attnlab.ops.sparsifiner import sparsifiner_attention


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
    computed in training mode only. ``keep=1`` is dense attention. The forward works per tile
    of query rows (connectivity, mask, attention and KL of the tile, recomputed in the
    backward: ``attnlab.ops.sparsifiner``), so memory is linear in L; ``attend_dense`` is the
    reference and ``weights()`` builds the dense matrix.
    """

    rows_per_tile: int | None = None  # query rows per tile; None: by memory (ops.sparsifiner)

    arguments: ClassVar[dict[str, Arg]] = {
        "keep": Arg("float", low=0, low_open=True, high=1),
        "rank": Arg("int", low=1),
        "distill_weight": Arg("float", low=0),
    }

    def __init__(self, dim: int, heads: int, *, keep: float = 0.25, rank: int = 16,
                 distill_weight: float = 1.0, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.keep, self.rank, self.distill_weight = keep, rank, distill_weight
        self.conn_a = nn.Linear(dim, heads * rank, bias=False)
        self.conn_b = nn.Linear(dim, heads * rank, bias=False)

    def predictor(self, call: Call) -> tuple[Tensor, Tensor]:
        """The low-rank factors (B, H, L, r) whose products are the connectivity scores."""
        return (self.split_heads(self.conn_a(call.x), self.heads),
                self.split_heads(self.conn_b(call.x), self.heads))

    def pair_scores(self, a: Tensor, b: Tensor) -> Tensor:
        """C = a b^T / sqrt(r) for factor rows ``a`` and ``b``."""
        return (a @ b.transpose(-1, -2)) / math.sqrt(self.rank)

    def connectivity(self, call: Call) -> Tensor:
        """Predicted connectivity scores C (B, H, L, L)."""
        return self.pair_scores(*self.predictor(call))

    def kept(self, lk: int) -> int:
        """k = ceil(keep * Lk) keys per query (at most Lk)."""
        return min(lk, math.ceil(self.keep * lk))

    def _mask(self, q: Tensor, k: Tensor, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        vis = self.visibility(q, k, call)
        if vis is None:
            vis = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
        vis = vis.expand(q.shape[0], self.heads, q.shape[2], k.shape[2])
        scores = self.connectivity(call)
        return top_keys(scores.detach(), vis, self.kept(k.shape[2])), scores, vis

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """Per tile of query rows (``ops.sparsifiner``, each recomputed in the backward): the
        tile's (rows, Lk) connectivity, its top-k mask, attention and distillation term,
        never (L, L). The loss divides by the rows that see a key without a host sync."""
        a, c = self.predictor(call)
        distill = self.training and self.distill_weight > 0
        out, kl_sum, kl_rows = sparsifiner_attention(
            q, k, v, a, c, keep=self.kept(k.shape[2]), causal=self.causal, mask=call.op_mask,
            distill=distill, rows=self.rows_per_tile)
        if distill:
            self._extra_loss = self.distill_weight * kl_sum / kl_rows.clamp_min(1)
        return out

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """The reference: the whole (L, L) connectivity, mask and distillation at once."""
        keep, scores, vis = self._mask(q, k, call)
        if self.training and self.distill_weight > 0:
            kl = self._distillation(q, k, scores, vis)
            rows = vis.any(-1)
            self._extra_loss = self.distill_weight * kl[rows].mean() if rows.any() else \
                kl.sum() * 0
        return softmax_attention(q, k, v, mask=keep)

    @staticmethod
    def _distillation(q: Tensor, k: Tensor, scores: Tensor, vis: Tensor) -> Tensor:
        """KL(dense attention (detached) || softmax(C)) per query row."""
        dense = softmax_weights(q.detach(), k.detach(), mask=vis)
        wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float64 stays
        log_pred = torch.log_softmax(wide.masked_fill(~vis, -1e9), dim=-1)
        return (dense * (torch.log(dense.clamp_min(1e-12)) - log_pred)).sum(-1)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        keep, _, _ = self._mask(q, k, call)
        return softmax_weights(q, k, mask=keep)
