"""Sparsifiner: a connectivity predictor picks the keys each query attends to."""

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

PREDICTORS = ("basis", "lowrank")


def _trunc_normal(t: Tensor, std: float = 0.02) -> None:
    """timm's trunc_normal_(std=0.02): N(0, std) cut at +-2 (absolute: 100 std, so normal)."""
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class BasisPredictor(nn.Module):
    """The official Sparsifiner ``MaskPredictor``: the heads' q and k reduced to
    ``head_dim // reduce_c`` channels (``proj_c_q``, ``proj_c_k``, shared by the heads), the
    keys' token axis compressed onto ``tokens // reduce_n`` basis tokens (``proj_n``), and
    the connectivity of each query read back through a second basis (``proj_back_n``):

        coef = softmax(q_c (k_c^T P_n) / sqrt(H))            (B, H, L, n)
        C    = top_t(coef) threshold(|P_back|^T, tau)        (B, H, L, L)

    (top_t keeps each row's ``coef_topk`` largest coefficients, the others 0; the threshold
    zeroes basis entries of magnitude <= ``basis_threshold``). In distillation the official
    reads C_rec = coef P_back^T (all coefficients, raw basis). ``tokens`` is the number of
    rows of P_n and P_back: an input of L <= tokens tokens uses their first L rows (as the
    input padded to ``tokens`` with masked tokens, whose reduced keys are 0)."""

    def __init__(self, heads: int, head_dim: int, *, tokens: int, reduce_n: int,
                 reduce_c: int, coef_topk: int, basis_threshold: float) -> None:
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.coef_topk, self.basis_threshold = coef_topk, basis_threshold
        reduced_c, reduced_n = max(1, head_dim // reduce_c), max(1, tokens // reduce_n)
        self.proj_c_q = nn.Linear(head_dim, reduced_c)
        self.proj_c_k = nn.Linear(head_dim, reduced_c)
        self.proj_n = nn.Parameter(torch.empty(tokens, reduced_n))
        self.proj_back_n = nn.Parameter(torch.empty(tokens, reduced_n))
        self._init_official()

    def reset_parameters(self) -> None:
        """As built: nn.Linear's own init of ``proj_c_q`` and ``proj_c_k`` (their draws),
        then the official one."""
        self.proj_c_q.reset_parameters()
        self.proj_c_k.reset_parameters()
        self._init_official()

    def _init_official(self) -> None:
        """The official initialisation: every weight trunc-normal std 0.02, biases 0."""
        for t in (self.proj_c_q.weight, self.proj_c_k.weight, self.proj_n, self.proj_back_n):
            _trunc_normal(t)
        nn.init.zeros_(self.proj_c_q.bias)
        nn.init.zeros_(self.proj_c_k.bias)

    def check_length(self, length: int) -> None:
        if length > self.tokens:
            raise ValueError(f"sparsifiner: {length} tokens, more than the predictor's basis "
                             f"covers (tokens={self.tokens}); build it with tokens >= "
                             f"{length}")

    def coefficients(self, q: Tensor, k: Tensor, vis: Tensor | None) -> Tensor:
        """softmax((q_c k_c^T restricted to the visible keys) P_n / sqrt(H)): (B, H, L, n).
        Without causality or padding this is q_c (k_c^T P_n); each query's compression
        holds only the keys it sees (padded keys' reduced rows are 0 as in the official;
        a causal query's, of the past only). In the wider of q's and the parameters' dtypes,
        autocast off (q and k come in autocast's dtype)."""
        with torch.autocast(q.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, self.proj_n.dtype)
            qc, kc = self.proj_c_q(q.to(dtype)), self.proj_c_k(k.to(dtype))
            basis = self.proj_n[:k.shape[2]]
            if vis is None:
                cheap = qc @ (kc.mT @ basis)
            else:
                cheap = ((qc @ kc.mT) * vis) @ basis
            return torch.softmax(cheap * self.heads ** -0.5, dim=-1)

    def kept_coefficients(self, coef: Tensor) -> Tensor:
        """Each row's ``coef_topk`` largest coefficients, the others 0."""
        top = min(self.coef_topk, coef.shape[-1])
        values, index = coef.topk(top, dim=-1)
        return torch.zeros_like(coef).scatter(-1, index, values)

    def basis(self, length: int) -> Tensor:
        """threshold(|P_back|): (L, n), entries of magnitude <= basis_threshold zeroed."""
        b = self.proj_back_n[:length].abs()
        return b.masked_fill(b <= self.basis_threshold, 0.0)

    def factors(self, q: Tensor, k: Tensor, vis: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """(a, c, coef) with C = a c^T: the kept coefficients (B, H, L, n) and the thresholded
        basis (B, H, L, n), and the coefficients themselves (B, H, L, n)."""
        coef = self.coefficients(q, k, vis)
        c = self.basis(k.shape[2]).expand(*coef.shape[:2], k.shape[2], -1)
        return self.kept_coefficients(coef), c, coef

    def reconstruction(self, coef: Tensor, length: int) -> Tensor:
        """C_rec = coef P_back^T (B, H, L, L): what the official distillation trains."""
        with torch.autocast(coef.device.type, enabled=False):
            return coef @ self.proj_back_n[:length].mT.to(coef.dtype)


@register("sparsifiner", family="sparse",
          paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient "
                "Vision Transformers", causal=True, bidirectional=True, decode=False,
          domains=("image", "seq"), complexity="n^2 r + n k d", weights=True,
          cross=False,
          variants=({"keep": 1.0}, {"predictor": "lowrank", "keep": 0.5, "rank": 4},
                    {"cls_token": False, "coef_topk": 2, "reduce_n": 3, "keep": 0.5}))
class SparsifinerAttention(Attention):
    """Instance-dependent sparse attention from a learned connectivity predictor.

    "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
    Transformers" (Wei et al., 2023), as its official ``Attention`` + ``MaskPredictor``
    (``predictor="basis"``, :class:`BasisPredictor`): the predicted connectivity

        C = top_t(softmax(q_c (k_c^T P_n) / sqrt(H))) threshold(|P_back|^T)

    from the heads' own q and k; each query keeps its k = ceil(``keep`` * L) visible keys of
    highest C (the binarised mask M; the first token, the cls token, keeps every key when
    ``cls_token``) and O = softmax(c Q K^T restricted to M) V. The predictor learns by
    distillation of the attention it approximates: in training mode ``extra_loss()`` =
    ``distill_weight`` (0.01, the official weight) * sum over rows i (the cls row excepted)
    and visible keys j of (C_rec,ij - A_ij)^2, with C_rec = softmax(..) P_back^T (all
    coefficients, raw basis, as the official reconstruction phase) and A the module's own
    dense softmax attention (no gradient; the official distils a teacher's attention with
    the backbone frozen, so the loss reaches only the predictor here too). The output is the
    sparse attention in training and evaluation. ``tokens`` (197: a 224-pixel ViT-B/16 with
    its cls token) is the basis' length: inputs of at most that many tokens.

    ``predictor="lowrank"`` is attnlab's earlier predictor: C = (x W_a)(x W_b)^T / sqrt(r)
    per head (``rank`` r) with ``extra_loss()`` = ``distill_weight`` * KL(dense attention ||
    softmax(C)) (weight 1 in the earlier default), any length, no cls row. The attention
    runs per tile of query rows (``attnlab.ops.sparsifiner``: memory linear in L;
    ``attend_dense`` is the reference) and ``weights()`` builds the dense matrix.
    """

    rows_per_tile: int | None = None  # query rows per tile; None: by memory (ops.sparsifiner)

    arguments: ClassVar[dict[str, Arg]] = {
        "predictor": Arg("str", choices=PREDICTORS),
        "tokens": Arg("int", low=1),
        "keep": Arg("float", low=0, low_open=True, high=1),
        "reduce_n": Arg("int", low=1),
        "reduce_c": Arg("int", low=1),
        "coef_topk": Arg("int", low=1),
        "basis_threshold": Arg("float", low=0),
        "cls_token": Arg("bool"),
        "rank": Arg("int", low=1),
        "distill_weight": Arg("float", low=0),
    }

    def __init__(self, dim: int, heads: int, *, predictor: str = "basis", tokens: int = 197,
                 keep: float = 0.25, reduce_n: int = 6, reduce_c: int = 2, coef_topk: int = 8,
                 basis_threshold: float = 0.02, cls_token: bool = True, rank: int = 16,
                 distill_weight: float = 0.01, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.kind, self.keep, self.rank = predictor, keep, rank
        self.distill_weight = distill_weight
        self.cls_token = cls_token and predictor == "basis"
        if predictor == "basis":
            self.predictor = BasisPredictor(
                heads, self.qk_width, tokens=tokens, reduce_n=reduce_n, reduce_c=reduce_c,
                coef_topk=coef_topk, basis_threshold=basis_threshold)
        else:
            self.conn_a = nn.Linear(dim, heads * rank, bias=False)
            self.conn_b = nn.Linear(dim, heads * rank, bias=False)

    @property
    def qk_width(self) -> int:
        """Width of the q and k that enter the op (the predictor's input)."""
        return getattr(self, "qk_dim", None) or self.head_dim

    # ---------------------------------------------------------------- the earlier predictor
    def lowrank_factors(self, call: Call) -> tuple[Tensor, Tensor]:
        """The low-rank factors (B, H, L, r) whose products are the connectivity scores."""
        return (self.split_heads(self.conn_a(call.x), self.heads),
                self.split_heads(self.conn_b(call.x), self.heads))

    def pair_scores(self, a: Tensor, b: Tensor) -> Tensor:
        """C = a b^T / sqrt(r) for factor rows ``a`` and ``b``."""
        return (a @ b.transpose(-1, -2)) / math.sqrt(self.rank)

    # ------------------------------------------------------------------------ common
    def kept(self, lk: int) -> int:
        """k = ceil(keep * Lk) keys per query (at most Lk)."""
        return min(lk, math.ceil(self.keep * lk))

    def _visible(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        vis = self.visibility(q, k, call)
        if vis is None:
            vis = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
        return vis.expand(q.shape[0], self.heads, q.shape[2], k.shape[2])

    def connectivity(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        """Predicted connectivity scores C (B, H, L, L) (the basis predictor reads q, k)."""
        if self.kind == "lowrank":
            return self.pair_scores(*self.lowrank_factors(call))
        self.predictor.check_length(k.shape[2])
        a, c, _ = self.predictor.factors(q.detach(), self.expand_kv(k).detach(),
                                         self.visibility(q, k, call))
        return a @ c.mT

    def _mask(self, q: Tensor, k: Tensor, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        """The kept keys (cls row: every visible key), C and the visibility."""
        vis = self._visible(q, k, call)
        scores = self.connectivity(q, k, call)
        keep = top_keys(scores.detach(), vis, self.kept(k.shape[2]))
        if self.cls_token:
            keep = torch.cat([vis[:, :, :1], keep[:, :, 1:]], dim=2)
        return keep, scores, vis

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """Per tile of query rows (``ops.sparsifiner``, each recomputed in the backward): the
        tile's (rows, Lk) connectivity, its top-k mask and attention, never (L, L) (the
        earlier predictor's distillation too; the basis predictor's is (L, L), as its
        length is bounded by ``tokens``). The cls row attends to every visible key."""
        if self.kind == "lowrank":
            return self._attend_lowrank(q, k, v, call)
        self.predictor.check_length(k.shape[2])
        vis = self.visibility(q, k, call)
        a, c, coef = self.predictor.factors(q.detach(), self.expand_kv(k).detach(), vis)
        out, _, _ = sparsifiner_attention(
            q, k, v, a, c, keep=self.kept(k.shape[2]), causal=self.causal, mask=call.op_mask,
            rows=self.rows_per_tile, conn_scale=1.0)
        if self.cls_token and q.shape[2] > 0:
            first = softmax_attention(q[:, :, :1], k, v, mask=_first_row(vis))
            out = torch.cat([first.to(out.dtype), out[:, :, 1:]], dim=2)
        if self.training and self.distill_weight > 0:
            self._extra_loss = self.distill_weight * self._reconstruction(q, k, coef, call)
        return out

    def _attend_lowrank(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        a, c = self.lowrank_factors(call)
        distill = self.training and self.distill_weight > 0
        out, kl_sum, kl_rows = sparsifiner_attention(
            q, k, v, a, c, keep=self.kept(k.shape[2]), causal=self.causal, mask=call.op_mask,
            distill=distill, rows=self.rows_per_tile)
        if distill:
            self._extra_loss = self.distill_weight * kl_sum / kl_rows.clamp_min(1)
        return out

    def _reconstruction(self, q: Tensor, k: Tensor, coef: Tensor, call: Call) -> Tensor:
        """sum over the rows that see a key (the cls row excepted) and their visible keys of
        (C_rec - A)^2, A the dense attention without gradient (the official 'MSE, sum')."""
        vis = self._visible(q, k, call)
        dense = softmax_weights(q.detach(), k.detach(), mask=vis).to(coef.dtype)
        err = (self.predictor.reconstruction(coef, k.shape[2]) - dense).square() * vis
        return err[:, :, 1:].sum() if self.cls_token else err.sum()

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """The reference: the whole (L, L) connectivity, mask and distillation at once."""
        keep, scores, vis = self._mask(q, k, call)
        if self.training and self.distill_weight > 0:
            if self.kind == "lowrank":
                kl = self._distillation(q, k, scores, vis)
                rows = vis.any(-1)
                self._extra_loss = self.distill_weight * kl[rows].mean() if rows.any() else \
                    kl.sum() * 0
            else:
                coef = self.predictor.coefficients(q.detach(), self.expand_kv(k).detach(),
                                                   self.visibility(q, k, call))
                self._extra_loss = self.distill_weight * self._reconstruction(q, k, coef, call)
        return softmax_attention(q, k, v, mask=keep)

    @staticmethod
    def _distillation(q: Tensor, k: Tensor, scores: Tensor, vis: Tensor) -> Tensor:
        """KL(dense attention (detached) || softmax(C)) per query row (earlier predictor)."""
        dense = softmax_weights(q.detach(), k.detach(), mask=vis)
        wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float64 stays
        log_pred = torch.log_softmax(wide.masked_fill(~vis, -1e9), dim=-1)
        return (dense * (torch.log(dense.clamp_min(1e-12)) - log_pred)).sum(-1)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        keep, _, _ = self._mask(q, k, call)
        return softmax_weights(q, k, mask=keep)


def _first_row(vis: Tensor | None) -> Tensor | None:
    """The visibility of the first query row (None: every key)."""
    return None if vis is None else vis[..., :1, :]
