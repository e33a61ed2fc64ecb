"""Local linear attention (LLA)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.lla import lla_weights, local_linear_attention


@register("lla", family="linear",
          paper="Local Linear Attention: An Optimal Interpolation of Linear and Softmax "
                "Attention For Test-Time Regression",
          causal=True, bidirectional=True, decode=True, domains=("seq",),
          complexity="n^2 d^2 + n d^3", weights=True, cross=True,
          variants=({"ridge": 1.0},),
          notes="Quadratic like softmax: decodes with a KV cache (its weights depend on every "
                "key through exp(q.k)), not a fixed-size state.")
class LocalLinearAttention(Attention):
    """Local linear attention: o_i is the intercept of a weighted ridge regression.

    "Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention For
    Test-Time Regression": w_ij = exp(c q_i.k_j), z_ij = k_j - q_i, omega = sum w,
    mu = sum w z, Sigma = sum w z z^T + lambda omega I, rho = Sigma^-1 mu,
    s_ij = w_ij (1 - rho.z_ij) / (omega - mu.rho), o_i = sum_j s_ij v_j.
    lambda (``ridge``, default 10 as the official ``lla_attention``) -> inf recovers softmax
    attention; lambda must be > 0 (at 0 a query that sees fewer than D keys, the first ones
    of a causal sequence, has a singular Sigma). Quadratic in L: the ``chunked`` backend
    (default) bounds memory, and decoding uses a KV cache.
    """

    backends = ("auto", "reference", "chunked")

    arguments: ClassVar[dict[str, Arg]] = {
        "ridge": Arg("float", low=0, low_open=True),
    }

    def __init__(self, dim: int, heads: int, *, ridge: float = 10.0, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.ridge = ridge

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return local_linear_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                      ridge=self.ridge, backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return lla_weights(q, k, causal=self.causal, mask=call.op_mask, ridge=self.ridge)
