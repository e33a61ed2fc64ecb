"""Selective attention: query (and optionally value) temperatures."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.softmax import SoftmaxAttention


class Temperature(nn.Module):
    """tau(x_i, i) = 1 + sigmoid(alpha_h) ln(i) + tanh(f_h(x_i)), per head, i 1-based.

    ``alpha`` starts at 0 and ``f`` at 0, so the initial temperature is 1 + ln(i) / 2.
    """

    def __init__(self, dim: int, heads: int, token: bool) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(heads))
        self.token = nn.Linear(dim, heads) if token else None
        if self.token is not None:
            nn.init.zeros_(self.token.weight)
            nn.init.zeros_(self.token.bias)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, L, C), positions (L,) 0-based -> tau (B or 1, H, L, 1)."""
        log_i = torch.log1p(positions.to(x.dtype))  # ln(i) with 1-based i
        tau = 1.0 + torch.sigmoid(self.alpha).to(x.dtype)[:, None] * log_i[None, :]
        tau = tau.unsqueeze(0)
        if self.token is not None:
            tau = tau + torch.tanh(self.token(x)).transpose(1, 2)
        return tau.unsqueeze(-1)


@register("selective", family="scored",
          paper="Selective Attention: Enhancing Transformer through Principled Context Control",
          causal=True, bidirectional=True, decode=True, domains=("seq",), complexity="n^2 d",
          weights=True, cross=False,
          variants=({"value_temperature": True}, {"token_temperature": False}))
class SelectiveAttention(SoftmaxAttention):
    """Softmax attention with a position- and token-dependent query temperature.

    "Selective Attention: Enhancing Transformer through Principled Context Control":
    logits c * tau_q(x_i, i) * q_i.k_j, tau_q = tau_pos(i) + tau_tok(x_i),
    tau_pos(i) = 1 + sigmoid(alpha) ln(i) (i 1-based), tau_tok = tanh(f(x_i)), f: C -> H.
    ``value_temperature=True`` scales each value the same way, v_j <- tau_v(x_j, j) v_j, with
    its own parameters. The temperatures add (2 if both) * (C + 1) * H parameters.
    hook_q holds the temperature-scaled queries.
    """

    def __init__(self, dim: int, heads: int, *, token_temperature: bool = True,
                 value_temperature: bool = False, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.query_temperature = Temperature(dim, heads, token_temperature)
        self.value_temperature = (Temperature(dim, self.kv_heads, token_temperature)
                                  if value_temperature else None)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call
                ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().prepare(q, k, v, call)
        q = q * self.query_temperature(call.x, call.positions).to(q.dtype)
        if self.value_temperature is not None:
            v = v * self.value_temperature(call.x, call.positions).to(v.dtype)
        return q, k, v
