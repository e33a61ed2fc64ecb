"""Softplus attention with length scaling and re-weighting (LSSA / LSSAR)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.ops.softplus import softplus_attention, softplus_weights


@register("softplus", family="scored",
          paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large "
                "Language Models", causal=True, bidirectional=True, decode=True,
          domains=("seq",), complexity="n^2 d", weights=True, cross=True,
          variants=({"reweight_p": None}, {"reweight_p": 3.0}),
          notes="The '- 1' of LSSAR is skipped for rows seeing <= 3 keys (the paper's first 3 "
                "rows of a causal sequence).")
class SoftplusAttention(Attention):
    """Length-scale softplus attention, re-weighted (LSSAR) by default.

    "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language
    Models". LSSA: q̂, k̂ are per-head L2-normalised,
    A_ij = softplus(ln(d) ln(N_i) q̂_i.k̂_j) over the N_i keys row i sees, rows L1-normalised.
    LSSAR (``reweight_p=p``, default 15): A <- relu(N_i A - 1)^p, L1-normalised again (the
    "- 1" is skipped for rows that see at most 3 keys). ``reweight_p=None`` or ``0`` gives
    LSSA (``0`` because TOML sweep files have no null: ``kwargs = { reweight_p = 0 }``).
    Backends: ``tiled`` (CPU default, memory-bounded training), ``reference``, ``flex``.
    """

    backends = ("auto", "reference", "tiled", "flex")

    arguments: ClassVar[dict[str, Arg]] = {
        "reweight_p": Arg("float", optional=True, rule="that is 0 (LSSA) or >= 1",
                          test=lambda p: p == 0 or p >= 1),
    }

    def __init__(self, dim: int, heads: int, *, reweight_p: float | None = 15.0,
                 **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if reweight_p == 0:
            reweight_p = None
        self.reweight_p = reweight_p

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return softplus_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                  reweight_p=self.reweight_p, backend=self.backend)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return softplus_weights(q, k, causal=self.causal, mask=call.op_mask,
                                reweight_p=self.reweight_p)
