"""Hedgehog: linear attention with a learnable, softmax-mimicking feature map."""

from __future__ import annotations

import copy
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.linear import LinearFamily
from attnlab.modules.rotary import Rotary
from attnlab.ops.common import at_least_float32
from attnlab.ops.linear import linear_attention, safe_divide
from attnlab.ops.softmax import softmax_weights

FEATURES = ("exp", "softmax")
EXP_CLAMP = 30.0
SOFTMAX_FLOOR = 1e-12  # the softmax features are clamped from below, as LoLCATs' SoftmaxDim


class HedgehogFeatureMap(nn.Module):
    """phi_h(x) = [f(x W_h + b_h), f(-x W_h - b_h)], W_h (D x F) identity-initialised, per head.

    ``f = exp`` is the paper's map (default; x W + b is clamped to +-30 so that products and
    sums of features stay finite in float32); ``f = softmax`` over the feature dimension is
    the map of the authors' later code (LoLCATs' ``softmax_dim``, clamped below at 1e-12),
    which distils less well here (tests/mechanisms/test_linear_properties.py).
    ``feature_dim``: F (default D); ``bias``: whether b_h exists.
    """

    def __init__(self, heads: int, head_dim: int, feature: str, *,
                 feature_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"hedgehog: feature must be one of {FEATURES}, got {feature!r}")
        feature_dim = head_dim if feature_dim is None else feature_dim
        if feature_dim < 1:
            raise ValueError(f"hedgehog: feature_dim must be >= 1, got {feature_dim}")
        self.feature = feature
        self.weight = nn.Parameter(torch.empty(heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.empty(heads, 1, feature_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity init of the Hedgehog feature map: W = I per head, b = 0."""
        heads, head_dim, feature_dim = self.weight.shape
        with torch.no_grad():
            self.weight.copy_(torch.eye(head_dim, feature_dim, device=self.weight.device)
                              .repeat(heads, 1, 1))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Features in float32 at least: exp(30) overflows float16."""
        x = at_least_float32(x)
        y = torch.einsum("bhld,hde->bhle", x, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.feature == "exp":
            y = y.clamp(-EXP_CLAMP, EXP_CLAMP)
            return torch.cat([y.exp(), (-y).exp()], dim=-1)
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1).clamp_min(SOFTMAX_FLOOR)


@register("hedgehog", family="linear",
          paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
          causal=True, bidirectional=True, decode=True, domains=("seq",), complexity="n d^2",
          weights=True, cross=True, variants=({"feature": "softmax"}, {"distill": True}))
class HedgehogAttention(LinearFamily):
    """Linear attention with a learnable feature map trained to mimic softmax.

    "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry":
    phi_h(x) = [exp(x W_h + b_h), exp(-x W_h - b_h)] (``feature="exp"``, default;
    ``"softmax"`` normalises each half over the features), W_h identity-initialised;
    y_i = phi_q(q_i) S_i / phi_q(q_i) z_i as in linear attention (S, z from phi_k(k_j)), with
    a fixed-size state. The query and key maps are separate (``phi``, ``phi_k``; equal at
    initialisation), as in the authors' code; ``tie_qk=True`` shares one map (attnlab's earlier
    default). ``feature_dim`` (default head_dim) and ``feature_bias`` shape W_h and b_h.
    ``distill=True``: in training, ``extra_loss()`` returns the cross-entropy
    -sum_j softmax(c q_i.k_j) log w_ij averaged over rows, with q and k detached so that only
    the feature map learns to mimic the softmax attention of the same q and k.

    Official code (HazyResearch/lolcats @ 375df84, src/model/linear_attention/
    linear_attention.py ``LolcatsLinearAttention`` with src/model/feature_map.py): with
    ``feature="softmax", feature_bias=False`` (its Hedgehog configuration) equal to 8e-12 of
    scale in float64 (all of it the normaliser's eps: LoLCATs adds 1e-12, attnlab clamps at
    1e-6), output, input and parameter gradients (tests/parity/test_hedgehog.py); the default
    keeps the Hedgehog paper's exp map with b_h and identity init
    (docs/mechanisms/hedgehog.md).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "feature": Arg("str", choices=FEATURES),
        "distill": Arg("bool"),
        "chunk_size": Arg("int", low=1),
        "tie_qk": Arg("bool"),
        "feature_dim": Arg("int", optional=True, low=1),
        "feature_bias": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, feature: str = "exp",
                 distill: bool = False, chunk_size: int = 64, tie_qk: bool = False,
                 feature_dim: int | None = None, feature_bias: bool = True,
                 **kwargs) -> None:
        kwargs.setdefault("rotary", partial(Rotary, float32_frequencies=True))
        super().__init__(dim, heads, **kwargs)
        self.phi = HedgehogFeatureMap(self.heads, self.head_dim, feature,
                                      feature_dim=feature_dim, bias=feature_bias)
        # the key map: a copy of the query map (LoLCATs deep-copies it), or the same map
        self.phi_k = None if tie_qk else copy.deepcopy(self.phi)
        self.tie_qk = tie_qk
        self.distill, self.chunk_size = distill, chunk_size

    def key_map(self, k: Tensor) -> Tensor:
        """phi_k of keys already in the query heads' layout."""
        return (self.phi if self.phi_k is None else self.phi_k)(k)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        if self.distill and self.training:
            self._extra_loss = self.distillation_loss(q, k, call)
        decoding = call.state is not None
        fq, fk = self.phi(q), self.key_map(self.expand_kv(k))
        out = linear_attention(fq, fk, self.expand_kv(v).to(fq.dtype),
                               causal=self.causal, feature_map="identity",
                               chunk_size=self.chunk_size, mask=call.op_mask,
                               state=self.read_state(call, "S", "z"), return_state=decoding)
        if decoding:
            out, (s, z) = out
            self.write_state(call, S=s, z=z)
        return out.to(v.dtype)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        a = self.phi(q) @ self.key_map(self.expand_kv(k)).transpose(-1, -2)
        vis = self.visibility(q, k, call)
        a = a if vis is None else a.masked_fill(~vis, 0.0)
        return safe_divide(a, a.sum(-1), 1e-6)

    def distillation_loss(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        """Cross-entropy from the softmax weights of (q, k) to the Hedgehog weights."""
        q, k = q.detach(), k.detach()
        teacher = softmax_weights(q, k, causal=self.causal, mask=call.op_mask)
        student = self.attention_weights(q, k, call)
        ce = -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1)
        rows = teacher.sum(-1) > 0
        return ce[rows].mean() if rows.any() else ce.sum() * 0
