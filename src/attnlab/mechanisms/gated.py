"""Gated attention: softmax attention with a sigmoid output gate."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

from attnlab.core.arguments import Arg
from attnlab.core.registry import register
from attnlab.mechanisms.softmax import SoftmaxAttention
from attnlab.modules.gates import OutputGate, make_gate
from attnlab.modules.reset import replay_draws
from attnlab.modules.rotary import Rotary

QWEN3_RMS_EPS = 1e-6  # the official q/k RMSNorm's eps (Qwen3 config rms_norm_eps)


@register("gated", family="scored",
          paper="Gated Attention for Large Language Models: Non-linearity, Sparsity, and "
                "Attention-Sink-Free", causal=True, bidirectional=True, decode=True,
          domains=("seq", "image"), complexity="n^2 d", weights=True, cross=True,
          variants=({"gate": "headwise"},))
class GatedAttention(SoftmaxAttention):
    """Softmax attention whose per-head output is gated before the output projection.

    "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
    Attention-Sink-Free" (Qiu et al.): Y' = Y * sigmoid(x W_g), x = the block input after its
    norm; ``gate="elementwise"`` (default, one gate per channel) or ``"headwise"`` (one scalar
    per head and token). The same gate is the ``gate=`` option of every mechanism.

    Official code (qiuzh20/gated_attention @ 49645df, modeling_qwen3.py ``Qwen3Attention``):
    equal to 1e-15 of scale in float64, output, input and parameter gradients
    (tests/parity/test_gated.py). There the gate rows are part of ``q_proj``, so the gate has
    a bias only when the projections have one: ``gate_bias=None`` (default) follows ``bias``
    (False by default: no gate bias); ``gate_bias=True`` is the earlier attnlab gate with
    b_g. With ``qk_norm=True`` the q/k RMSNorm has Qwen3's eps 1e-6, with ``rope=True`` the
    angles are Hugging Face's (float32); both stay off by default as in ``softmax`` (Qwen3's
    backbone choices, docs/mechanisms/gated.md).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "gate": Arg("str", choices=("elementwise", "headwise"),
                    rule="(use 'softmax' for the ungated module)"),
        "gate_bias": Arg("bool", optional=True),
    }

    def __init__(self, dim: int, heads: int, *, gate: str = "elementwise",
                 gate_bias: bool | None = None, **kwargs) -> None:
        kwargs.setdefault("rotary", partial(Rotary, float32_frequencies=True))
        super().__init__(dim, heads, gate=gate, **kwargs)
        self.gate_bias = self.shape.bias if gate_bias is None else bool(gate_bias)
        self.gate = make_gate(dim, heads, self.head_dim, gate, bias=self.gate_bias)
        self._gate_kind = gate
        norm: Any  # nn.RMSNorm or nn.Identity
        for norm in (self.qk_norm.q, self.qk_norm.k):
            if hasattr(norm, "eps"):  # nn.RMSNorm when qk_norm is on
                norm.eps = QWEN3_RMS_EPS

    def _reset_part(self, name: str) -> None:
        if name == "gate" and isinstance(self.gate, OutputGate):
            # the base built a biased gate that this one replaced: replay its draws first
            replay_draws(lambda: make_gate(self.dim, self.heads, self.head_dim,
                                           self._gate_kind), like=self.gate.proj.weight)
        super()._reset_part(name)
