"""ACMIL attention pooling: multiple branches and stochastic top-K instance masking."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.common import nan_where, upcast


class GatedInstanceProjection(nn.Module):
    """Gated-attention MIL as q, k, v: q = the branch vectors w_m (the same for every token),
    k = tanh(V h) * sigmoid(U h) (instance features, one V and U shared by every branch),
    v = h (each branch pools the full instance features, no value projection).

    k and v are views expanded over the branches (heads); nothing is copied per branch.
    """

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape
        dim, attn_dim = shape.dim, shape.qk_dim
        self.features = nn.Linear(dim, attn_dim)  # V (official attention_V, then tanh)
        self.gate = nn.Linear(dim, attn_dim)  # U (official attention_U, then sigmoid)
        self.branch = nn.Linear(attn_dim, shape.heads, bias=False)  # w_m (attention_weights)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, heads = call.x, self.shape.heads
        b, length, _ = x.shape
        feats = torch.tanh(self.features(x)) * torch.sigmoid(self.gate(x))  # (B, L, D)
        q = self.branch.weight[None, :, None, :].expand(b, -1, length, -1).to(x.dtype)
        k = feats[:, None].expand(-1, heads, -1, -1)
        v = x[:, None].expand(-1, heads, -1, -1)
        return q, k, v


@register("mil_attention", family="head-mixing",
          paper="Attention-Challenging Multiple Instance Learning for Whole Slide Image "
                "Classification", causal=False, bidirectional=True, decode=False,
          domains=("image", "seq"), complexity="n d", weights=True, cross=False,
          unsupported=("kv_heads", "qk_norm", "rope"),
          variants=({"top_k": 2, "mask_rate": 0.5},))
class MILAttentionPooling(Attention):
    """Gated attention pooling over a bag of instances, one branch per head (ACMIL).

    "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification"
    (Zhang et al., 2023): instance scores s_mn = w_m . (tanh(V h_n) * sigmoid(U h_n)) (gated
    attention MIL; V, U shared by the branches, width ``attn_dim`` = 128) for branch m = head
    (multiple branch attention, MBA), a_m = softmax_n(s_mn), branch embedding
    z_m = sum_n a_mn h_n (the full instance features). In training, stochastic top-K instance
    masking (STKIM) masks exactly int(K * ``mask_rate``) of each branch's K = ``top_k``
    highest-scoring instances, chosen uniformly, and renormalises over the rest; the
    branch-diversity loss (mean cosine similarity of the branches' attention, times
    ``diversity_weight`` = 1) is ``extra_loss()``. The module keeps the (B, L, C) contract by
    giving every token its bag's slide embedding mean_m z_m (the official slide classifier's
    input, softmax averaged over branches); ``pool(x)`` returns the branch embeddings z_m
    (B, M, C) of the per-branch classifiers; ``weights()`` has identical rows a_m.

    Official code (dazhangyu123/ACMIL @ e53d19c, architecture/transformer.py ``ACMIL_GA``
    with ``Attention_Gated``, the loss in Step3_WSI_classification_ACMIL.py): equal to 1e-15
    of scale in float64 (tests/parity/test_mil_attention.py), STKIM drawing the same random
    numbers. Remaining differences (docs/mechanisms/mil_attention.md): no bias on w_m (a
    per-branch constant; softmax and top-K ignore it), padding, the dimension reduction and
    classifiers belong to the model.

    Under ``torch.compile`` (inductor) STKIM's uniform draw comes from inductor's own random
    generator, not from torch's: compiled training masks other instances than eager
    training with the same seed (the same distribution; eval has no draw and is equal).
    ``torch._inductor.config.fallback_random = True`` makes compiled draws equal eager
    ones (docs/mechanisms/mil_attention.md).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "top_k": Arg("int", low=0),
        "mask_rate": Arg("float", low=0, high=1, high_open=True),
        "attn_dim": Arg("int", low=1),
        "diversity_weight": Arg("float", low=0),
    }

    def __init__(self, dim: int, heads: int, *, top_k: int = 10, mask_rate: float = 0.6,
                 attn_dim: int = 128, diversity_weight: float = 1.0, **kwargs) -> None:
        if kwargs.get("head_dim") not in (None, dim):
            raise ValueError(f"mil_attention: every branch pools the full features, so "
                             f"head_dim is dim={dim}, got head_dim={kwargs['head_dim']}")
        kwargs["head_dim"] = dim
        super().__init__(dim, heads, projection=GatedInstanceProjection, qk_dim=attn_dim,
                         output_projection=False, **kwargs)
        self.top_k, self.mask_rate = top_k, mask_rate
        self.attn_dim, self.diversity_weight = attn_dim, diversity_weight

    def _scores(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        """Instance scores (B, M, 1, N) with padding (and STKIM in training) at -inf."""
        q, k = upcast(q[:, :, :1], k)  # one query per branch
        s = q @ k.transpose(-1, -2)
        if call.key_mask is not None:
            s = s.masked_fill(~call.key_mask[:, None, None, :], float("-inf"))
        top_k = min(self.top_k, s.shape[-1])
        count = int(top_k * self.mask_rate)  # exactly this many of the top-K, as the official
        if self.training and count > 0:
            top = s.topk(top_k, dim=-1).indices  # (B, M, 1, K)
            # a uniformly random subset of ``count`` of them: the first of a random order
            pick = torch.argsort(torch.rand(top.shape, device=s.device), dim=-1)[..., :count]
            masked = top.gather(-1, pick)
            dropped = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, masked, True)
            still = (s > float("-inf")) & ~dropped
            s = torch.where(still.any(-1, keepdim=True), s.masked_fill(dropped, float("-inf")),
                            s)
        return s

    def _attention(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        s = self._scores(q, k, call)
        top = s.amax(-1, keepdim=True)
        a = torch.softmax(s - torch.where(torch.isfinite(top), top, 0.0), -1)
        return torch.nan_to_num(a, nan=0.0)  # (B, M, 1, N)

    def _diversity(self, a: Tensor) -> None:
        """Training: mean over branch pairs (and bags) of the cosine similarity of their
        attention over the instances, times ``diversity_weight``, as ``extra_loss()``."""
        m = a.shape[1]
        if not self.training or m < 2:
            return
        i, j = torch.triu_indices(m, m, offset=1, device=a.device)
        p = a[:, :, 0]  # (B, M, N)
        cos = F.cosine_similarity(p[:, i], p[:, j], dim=-1)  # (B, pairs)
        self._extra_loss = self.diversity_weight * cos.mean()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        a = self._attention(q, k, call)
        self._diversity(a)
        return (a.to(v.dtype) @ v).expand(-1, -1, q.shape[2], -1)

    def post(self, y: Tensor, call: Call) -> Tensor:
        """The branch embeddings (B, L, M * C) -> the slide embedding, their mean (B, L, C)."""
        return self.out_norm(y.unflatten(-1, (self.heads, self.dim)).mean(-2))

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return self._attention(q, k, call).expand(-1, -1, q.shape[2], -1)

    def pool(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Per-branch bag embeddings z_m (B, M, C), times ``head_scale``."""
        call = self._begin(x, mask, None, None, None, None)
        q, k, v = self._qkv(call)
        a = self._attention(q, k, call)
        self._diversity(a)
        z = (a.to(v.dtype) @ v)[:, :, 0] * self.head_scale.to(v.dtype)[:, None]  # (B, M, C)
        assert call.nonfinite is not None  # marked by _begin (propagates_nonfinite is False)
        return z + nan_where(call.nonfinite.any(-1, keepdim=True), z)
