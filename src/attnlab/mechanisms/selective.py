"""Selective attention: query (and optionally value) temperatures."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.softmax import SoftmaxAttention

BETA_INIT = 1.5  # the official beta at initialisation: slope exp(-exp(1.5)) = 0.0113


class Temperature(nn.Module):
    """tau(x_i, i) = 1 + exp(-exp(beta)) ln(i) + tanh(f_h(x_i)), i 1-based.

    The position slope exp(-exp(beta)) is the official parametrisation (umich-sota/
    selective_attention, lit_gpt/gpt_2_PTS.py): ``beta`` is one scalar shared by the heads
    (``per_head=True``: one per head), initialised at ``beta_init`` = 1.5 (slope 0.0113).
    ``f`` (the token temperature, C -> heads) starts at 0, so the initial temperature is
    1 + 0.0113 ln(i).
    """

    def __init__(self, dim: int, heads: int, token: bool, *, beta_init: float = BETA_INIT,
                 per_head: bool = False) -> None:
        super().__init__()
        self.beta_init = beta_init
        self.beta = nn.Parameter(torch.empty(heads if per_head else 1))
        self.token = nn.Linear(dim, heads) if token else None  # (draws nn.Linear's init)
        self._init_values()

    def _init_values(self) -> None:
        with torch.no_grad():
            self.beta.fill_(float(self.beta_init))
            if self.token is not None:  # zero-init: the temperature starts at beta alone
                nn.init.zeros_(self.token.weight)
                nn.init.zeros_(self.token.bias)

    def reset_parameters(self) -> None:
        """beta = ``beta_init``, the token term zero (after nn.Linear's draws, as built)."""
        if self.token is not None:
            self.token.reset_parameters()
        self._init_values()

    def slope(self) -> Tensor:
        """exp(-exp(beta)): (heads,) or (1,)."""
        return torch.exp(-torch.exp(self.beta))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, L, C), positions (L,) or (B, L) (per row), 0-based -> tau (B or 1, H, L,
        1)."""
        log_i = torch.log1p(positions.to(x.dtype))  # ln(i) with 1-based i
        if positions.dim() == 2:  # per row: (B, H, L)
            tau = 1.0 + self.slope().to(x.dtype)[None, :, None] * log_i[:, None, :]
        else:
            tau = 1.0 + self.slope().to(x.dtype)[:, None] * log_i[None, :]
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
    tau_pos(i) = 1 + exp(-exp(beta)) ln(i) (i 1-based; one beta for the layer, initialised at
    1.5 as the official code: slope 0.0113), tau_tok = tanh(f(x_i)), f: C -> H, zero at
    initialisation. ``value_temperature=True`` scales each value the same way,
    v_j <- tau_v(x_j, j) v_j, with its own parameters. ``beta_init`` sets the initial beta
    (ln(ln 2) = -0.367 gives the earlier slope 0.5), ``beta_per_head=True`` learns one beta
    per head (attnlab's earlier layout). The temperatures add about (C + 1) * H parameters
    each. hook_q holds the temperature-scaled queries.

    Official code (umich-sota/selective_attention @ 4ea6520, lit_gpt/gpt_2_PTS.py
    ``CausalSelfAttention``): with ``token_temperature=False`` equal to 1e-15 of scale in
    float64, output, input and parameter gradients (tests/parity/test_selective.py). The
    official code has the position temperature only; the paper's token temperature is on by
    default here and starts at 0, so at initialisation the default computes the official
    function (docs/mechanisms/selective.md).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "token_temperature": Arg("bool"),
        "value_temperature": Arg("bool"),
        "beta_init": Arg("float"),
        "beta_per_head": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, token_temperature: bool = True,
                 value_temperature: bool = False, beta_init: float = BETA_INIT,
                 beta_per_head: bool = False, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.query_temperature = Temperature(dim, heads, token_temperature,
                                             beta_init=beta_init, per_head=beta_per_head)
        self.value_temperature = (Temperature(dim, self.kv_heads, token_temperature,
                                              beta_init=beta_init, per_head=beta_per_head)
                                  if value_temperature else None)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, call: Call
                ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().prepare(q, k, v, call)
        q = q * self.query_temperature(call.x, call.positions).to(q.dtype)
        if self.value_temperature is not None:
            v = v * self.value_temperature(call.x, call.positions).to(v.dtype)
        return q, k, v
