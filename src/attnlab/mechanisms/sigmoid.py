"""Sigmoid self-attention."""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.norms import QK_NORM_KINDS, QKNorm
from attnlab.modules.rotary import Rotary
from attnlab.ops.sigmoid import sigmoid_attention, sigmoid_weights


@register("sigmoid", family="scored",
          paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention", causal=True,
          bidirectional=True, decode=True, domains=("seq", "image"), complexity="n^2 d",
          weights=True, cross=True, variants=({"hybrid_norm": True, "qk_norm": True},))
class SigmoidAttention(Attention):
    """Sigmoid attention: O = sigmoid(c Q K^T + b) V, without row normalisation.

    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al.).
    b = -ln(n) with n = ``max_len``, a fixed number (the training context length), so that a
    causal model decodes exactly as it runs in full. ``max_len=None`` uses n = the number of
    keys of each call (bidirectional only). ``score_bias`` sets b directly instead (0 is the
    paper's "no bias" control); ``learn_bias=True`` makes b a parameter of each head,
    initialised at that value (the paper's Section 3 discusses a learned b). Masked entries
    weigh exactly 0. The paper stabilises training with ``qk_norm=True`` and
    ``hybrid_norm=True`` (a LayerNorm on the attention output). With ``qk_norm=True`` q and k
    of each head pass a LayerNorm (affine, with a bias, eps 1e-5) as in the official module
    (apple/ml-sigmoid-attention ``Attention``, ``norm_layer=nn.LayerNorm``);
    ``qk_norm_kind="rms"`` is attnlab's common RMSNorm instead (the earlier sigmoid qk-norm).

    A learned per-head b enters every backend as one more channel of q and k:
    [q, b_h / c] . [k, 1] c = c q.k + b_h, so the memory-bounded tiled path serves it too.

    The default stays the paper's b = -ln(n), fixed, as its official code has it (there with
    qk-norm and nothing on the attention output). In small causal models b can decide the
    result: on MQAR at length 32 in attnlab's TransformerLM (docs/results/sigmoid_mqar.md)
    b = -ln 32 recalls ~0.59 of the values, with qk-norm 0.95 (the earlier RMSNorm qk-norm),
    b = -ln(32 / 8) all of them; a learned b cannot travel that far in 600 steps, and the
    hybrid norm hurts. A hand-written model reproduces this with the same embedding scale and
    reverses it with smaller embeddings: the best b depends on the model around the
    attention, so compare values of ``score_bias`` when sigmoid is a contestant.
    Backends: ``tiled`` (CPU default, memory-bounded training), ``reference``, ``flex``.
    """

    backends = ("auto", "reference", "tiled", "flex")

    arguments: ClassVar[dict[str, Arg]] = {
        "max_len": Arg("int", optional=True, low=1),
        "hybrid_norm": Arg("bool"),
        "score_bias": Arg("float", optional=True),
        "learn_bias": Arg("bool"),
        "qk_norm_kind": Arg("str", choices=QK_NORM_KINDS),
    }

    def __init__(self, dim: int, heads: int, *, max_len: int | None = 1024,
                 hybrid_norm: bool = False, score_bias: float | None = None,
                 learn_bias: bool = False, qk_norm_kind: str = "layer", **kwargs) -> None:
        # RoPE frequencies as the official precompute_freqs_cis: 1 / 10000^(2i/d) in float32
        kwargs.setdefault("rotary", partial(Rotary, float32_frequencies=True))
        super().__init__(dim, heads, output_norm=hybrid_norm, **kwargs)
        if kwargs.get("qk_norm", False):  # the official qk-norm: nn.LayerNorm(head_dim)
            self.qk_norm = QKNorm(self.shape.qk_dim, True, kind=qk_norm_kind)
        if max_len is None and score_bias is None and (self.causal or learn_bias):
            raise ValueError("sigmoid: causal attention (and learn_bias=True) needs a fixed "
                             "max_len (b = -ln(max_len)) or score_bias")
        self.max_len = max_len
        self.fixed_bias = None if score_bias is None else float(score_bias)
        self.learn_bias = learn_bias
        # b of each head, learned (initialised at the fixed b), or None
        self.head_bias = nn.Parameter(torch.empty(heads)) if learn_bias else None
        self.reset_bias()

    def _reset_own(self) -> None:
        self.reset_bias()

    def reset_bias(self) -> None:
        """Set the learned per-head b back to its initial value, the fixed b."""
        if self.head_bias is not None:
            with torch.no_grad():
                self.head_bias.fill_(self.score_bias(0))

    def score_bias(self, num_keys: int) -> float:
        """The fixed additive bias: ``score_bias`` if given, else b = -ln(n)."""
        if self.fixed_bias is not None:
            return self.fixed_bias
        return -math.log(self.max_len if self.max_len is not None else max(num_keys, 1))

    def _with_head_bias(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, float]:
        """(q', k', c) with c q'.k' = c q.k + b_h: one more channel, b_h / c on q, 1 on k."""
        c = q.shape[-1] ** -0.5
        b = (self.head_bias / c).to(q.dtype).view(1, -1, 1, 1).expand(*q.shape[:-1], 1)
        return (torch.cat([q, b], -1), torch.cat([k, k.new_ones(*k.shape[:-1], 1)], -1), c)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        if self.head_bias is not None:
            q, k, c = self._with_head_bias(q, k)
            return sigmoid_attention(q, k, v, causal=self.causal, mask=call.op_mask, scale=c,
                                     bias=0.0, backend=self.backend)
        return sigmoid_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                 bias=self.score_bias(k.shape[2]), backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        if self.head_bias is not None:
            q, k, c = self._with_head_bias(q, k)
            return sigmoid_weights(q, k, causal=self.causal, mask=call.op_mask, scale=c,
                                   bias=0.0)
        return sigmoid_weights(q, k, causal=self.causal, mask=call.op_mask,
                               bias=self.score_bias(k.shape[2]))
