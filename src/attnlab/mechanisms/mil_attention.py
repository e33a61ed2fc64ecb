"""ACMIL attention pooling: multiple branches and stochastic top-K instance masking."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import split_heads
from attnlab.ops.common import nan_where, upcast


class GatedInstanceProjection(nn.Module):
    """Gated-attention MIL as q, k, v: q = the branch vectors w_m (the same for every
    token), k = tanh(V h) * sigmoid(U h) (instance features), v = W_v h."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape
        dim, heads, d = shape.dim, shape.heads, shape.head_dim
        self.v = nn.Linear(dim, heads * d, bias=shape.bias)
        self.branch = nn.Parameter(torch.randn(heads, d) * d ** -0.5)  # w_m
        self.features = nn.Linear(dim, heads * d, bias=True)  # V
        self.gate = nn.Linear(dim, heads * d, bias=True)  # U

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, heads = call.x, self.shape.heads
        b, length, _ = x.shape
        feats = torch.tanh(self.features(x)) * torch.sigmoid(self.gate(x))
        q = self.branch[None, :, None, :].expand(b, -1, length, -1).to(x.dtype)
        return q, split_heads(feats, heads), split_heads(self.v(x), heads)


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
    attention MIL) for branch m = head (multiple branch attention, MBA), a_m =
    softmax_n(s_mn), bag embedding z_m = sum_n a_mn W_v h_n. In training, stochastic top-K
    instance masking (STKIM) drops each of a branch's ``top_k`` highest-scoring instances
    with probability ``mask_rate`` and renormalises over the rest. The module keeps the
    (B, L, C) contract by giving every token its bag's pooled vector (so ``weights()`` has
    identical rows a_m); ``pool(x)`` returns the per-branch bag embeddings (B, M, C).
    """

    def __init__(self, dim: int, heads: int, *, top_k: int = 10, mask_rate: float = 0.6,
                 **kwargs) -> None:
        if top_k < 0 or not 0.0 <= mask_rate < 1.0:
            raise ValueError(f"mil_attention: need top_k >= 0 and 0 <= mask_rate < 1, got "
                             f"{top_k}, {mask_rate}")
        super().__init__(dim, heads, projection=GatedInstanceProjection, **kwargs)
        self.top_k, self.mask_rate = top_k, mask_rate

    def _scores(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        """Instance scores (B, M, 1, N) with padding (and STKIM in training) at -inf."""
        q, k = upcast(q[:, :, :1], k)  # one query per branch
        s = q @ k.transpose(-1, -2)
        if call.key_mask is not None:
            s = s.masked_fill(~call.key_mask[:, None, None, :], float("-inf"))
        if self.training and self.top_k and self.mask_rate > 0:
            top = s.topk(min(self.top_k, s.shape[-1]), dim=-1).indices
            drop = torch.rand(top.shape, device=s.device) < self.mask_rate
            dropped = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, drop)
            still = (s > float("-inf")) & ~dropped
            s = torch.where(still.any(-1, keepdim=True), s.masked_fill(dropped, float("-inf")),
                            s)
        return s

    def _attention(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        s = self._scores(q, k, call)
        top = s.amax(-1, keepdim=True)
        a = torch.softmax(s - torch.where(torch.isfinite(top), top, 0.0), -1)
        return torch.nan_to_num(a, nan=0.0)  # (B, M, 1, N)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        a = self._attention(q, k, call)
        return (a.to(v.dtype) @ v).expand(-1, -1, q.shape[2], -1)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return self._attention(q, k, call).expand(-1, -1, q.shape[2], -1)

    def pool(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Per-branch bag embeddings (B, M, C): each branch's pooled value, projected."""
        call = self._begin(x, mask, None, None, None, None)
        q, k, v = self._qkv(call)
        z = self._attention(q, k, call).to(v.dtype) @ v  # (B, M, 1, D)
        eye = torch.eye(self.heads, device=x.device, dtype=v.dtype)
        per_branch = eye[None, :, :, None] * z[:, None, :, 0, :]  # (B, M, M, D): branch only
        bags = self.o_proj(per_branch.flatten(2))
        return bags + nan_where(call.nonfinite.any(-1, keepdim=True), bags)
