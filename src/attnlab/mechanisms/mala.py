"""Magnitude-aware linear attention (MALA)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.linear import LinearFamily
from attnlab.ops.common import row_counts
from attnlab.ops.linear import elu_plus_one, prefix_sums


@register("mala", family="linear", paper="Rectifying Magnitude Neglect in Linear Attention",
          causal=True, bidirectional=True, decode=True, domains=("image", "seq"),
          complexity="n d^2", weights=True, cross=True,
          notes="Vision (bidirectional) in the paper; the causal prefix form (means over "
                "j <= i) is an attnlab extension.")
class MagnitudeAwareLinearAttention(LinearFamily):
    """MALA: linear attention that keeps the query's magnitude.

    "Rectifying Magnitude Neglect in Linear Attention" (official code qhfan/MALA).
    phi = elu + 1, s_ij = c phi(q_i).phi(k_j), z_i = mean_j s_ij over the N_i visible keys,

        w_ij = (1 / N_i) [s_ij (1 + 1 / z_i) - z_i],     rows sum to 1,

    computed in linear time as o_i = (1/N_i)[(1 + 1/z_i) c phi(q_i) S_i - z_i sum_j v_j].
    Scaling q sharpens the weights (plain linear attention is invariant to it). The causal
    form (means over j <= i, a fixed-size state) is an attnlab extension of the vision paper.
    """

    arguments: ClassVar[dict[str, Arg]] = {}

    def _stats(self, q: Tensor, k: Tensor, v: Tensor, call: Call):
        return prefix_sums(elu_plus_one(q), elu_plus_one(k), v, causal=self.causal,
                           mask=call.op_mask, state=self.read_prefix(call))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        a, d, vsum, n, new = self._stats(q, k, v, call)
        self.write_prefix(call, new)
        c = q.shape[-1] ** -0.5
        seen = n > 0
        n = n.clamp_min(1.0).unsqueeze(-1)
        z = (c * d).unsqueeze(-1) / n
        # the 1/z term is (1 / N)(c A / z) = A / d, the normalised linear attention: a
        # weighted mean of the values, finite even where z underflows to 0
        positive = d > 0
        normalised = a / torch.where(positive, d, 1.0).unsqueeze(-1) * positive.unsqueeze(-1)
        out = (c * a - z * vsum) / n + normalised
        return (out * seen.unsqueeze(-1)).to(v.dtype)  # the sums are float32 at least

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        s, vis = self.kernel_scores(elu_plus_one, q, k, call)
        s = s * q.shape[-1] ** -0.5
        n = row_counts(vis, s)
        z = s.sum(-1, keepdim=True) / n.clamp_min(1.0)
        w = (s * (1 + 1 / z.clamp_min(1e-12)) - z) / n.clamp_min(1.0)
        return w if vis is None else w.masked_fill(~vis, 0.0)
