"""Dynamic Mask Attention: each query keeps the top-w keys of a learned content bias."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.masks import top_keys
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.reset import reset_module
from attnlab.modules.rotary import Rotary
from attnlab.ops.key_priority import key_priority_attention
from attnlab.ops.softmax import softmax_attention, softmax_weights

DOGE_RMS_EPS = 1e-6  # the official q/k RMSNorm's eps (DogeConfig rms_norm_eps)


@register("dma", family="sparse", paper="Trainable Dynamic Mask Sparse Attention",
          causal=True, bidirectional=True, decode=True, domains=("seq",), complexity="n^2 d",
          weights=True, cross=False, variants=({"window": 4}, {"window": 4, "kv_heads": 1}),
          notes="selection per tile of queries (ops.key_priority): Lq (w + tile) work")
class DynamicMaskAttention(Attention):
    """Softmax attention over the top-w keys of a learned, content-dependent key bias.

    "Trainable Dynamic Mask Sparse Attention" (SmallDoges/flash-dmattn): per kv head and
    key, delta_j = A_h * softplus(v_j W_delta)_h (A learnable, initialised at 0); each
    query keeps the w = ``window`` visible keys with the largest delta (default 2048, the
    official ``window_size``; ties: the most recent, so with A = 0 and a window shorter than
    the prefix it is a sliding window of w keys) and
    O = softmax(c Q K^T + delta over the kept keys) V. With w >= n and A = 0 it is softmax
    attention. Decoding recomputes delta from the cached values. The selection never builds
    the (Lq, Lk) matrix: ``attnlab.ops.key_priority`` works per tile of queries over the
    tile's w + tile candidate keys; ``attend_dense`` is the dense reference.

    Official code (SmallDoges/flash-dmattn @ f024c28, examples/modeling/modeling_doge.py
    ``DogeAttention`` with the Python reference ``dynamic_mask_attention_python`` of
    benchmarks/forward_equivalence.py and ``create_mask`` of flash_sparse_attn/utils/mask.py):
    equal to 1e-14 of scale in float64, output, input and parameter gradients
    (tests/parity/test_dma.py). As there, W_delta (``dt_proj``) has a bias only when the
    projections have one (``delta_bias=None`` follows ``bias``; ``delta_bias=True`` is the
    earlier attnlab projection); ``qk_norm=True`` uses Doge's eps 1e-6 and ``rope=True`` Hugging
    Face's float32 angles; both stay off by default (Doge's backbone; docs/mechanisms/dma.md).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "window": Arg("int", low=1),
        "delta_bias": Arg("bool", optional=True),
    }

    def __init__(self, dim: int, heads: int, *, window: int = 2048,
                 delta_bias: bool | None = None, **kwargs) -> None:
        kwargs.setdefault("rotary", partial(Rotary, float32_frequencies=True))
        super().__init__(dim, heads, **kwargs)
        self.window = window
        self.delta_bias = self.shape.bias if delta_bias is None else bool(delta_bias)
        # the official dt_proj: biased only with attention_bias (the projections' bias)
        self.delta_proj = nn.Linear(self.kv_heads * self.head_dim, self.kv_heads,
                                    bias=self.delta_bias)
        self.A = nn.Parameter(torch.zeros(self.kv_heads))
        norm: Any  # nn.RMSNorm or nn.Identity
        for norm in (self.qk_norm.q, self.qk_norm.k):
            if hasattr(norm, "eps"):  # nn.RMSNorm when qk_norm is on
                norm.eps = DOGE_RMS_EPS

    def _reset_own(self) -> None:
        reset_module(self.delta_proj)
        self.A.zero_()

    def key_priority(self, v: Tensor) -> Tensor:
        """delta (B, H_kv, Lk) from v (B, H_kv, Lk, D)."""
        flat = v.transpose(1, 2).flatten(2)  # (B, Lk, H_kv * D)
        delta = self.A.to(v.dtype) * F.softplus(self.delta_proj(flat))  # (B, Lk, H_kv)
        return delta.transpose(1, 2)

    def key_bias(self, v: Tensor) -> Tensor:
        """delta (B, H, 1, Lk) in the query heads' layout from v (B, H_kv, Lk, D)."""
        return self.expand_kv(self.key_priority(v).unsqueeze(-2))

    def _mask_and_bias(self, q: Tensor, k: Tensor, call: Call, v: Tensor):
        vis = self.visibility(q, k, call)
        if vis is None:
            vis = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=q.device)
        bias = self.key_bias(v)
        vis = vis.expand(q.shape[0], self.heads, q.shape[2], k.shape[2])
        keep = top_keys(bias, vis, self.window)
        return keep, bias

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return key_priority_attention(q, k, v, self.key_priority(v), window=self.window,
                                      causal=self.causal, mask=call.op_mask)

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        """The reference: the (Lq, Lk) top-w mask of ``top_keys`` and softmax attention."""
        keep, bias = self._mask_and_bias(q, k, call, v)
        return softmax_attention(q, k, v, mask=keep, bias=bias.to(q.dtype))

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        v = call.extras["v"]
        keep, bias = self._mask_and_bias(q, k, call, v)
        return softmax_weights(q, k, mask=keep, bias=bias)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call):
        q, k, v = super().prepare(q, k, v, call)
        call.extras["v"] = v  # attention_weights needs the values for delta
        return q, k, v

    def update_state(self, k: Tensor, v: Tensor, call: Call):
        k, v, mask = super().update_state(k, v, call)
        call.extras["v"] = v
        return k, v, mask
