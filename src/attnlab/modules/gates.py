"""The output gate of Gated Attention, available to every mechanism through ``gate=``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

GATE_KINDS = ("headwise", "elementwise")


class OutputGate(nn.Module):
    """Y' = Y * sigmoid(x W_g [+ b_g]), applied to the per-head attention output.

    "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
    Attention-Sink-Free". ``headwise``: one scalar per head and token, W_g: C -> H;
    ``elementwise``: one per channel, W_g: C -> H * D. x is the block input (after its norm).
    ``bias``: whether the gate has b_g (the official gate is part of the query projection and
    has a bias only when that does; the ``gate=`` option of every mechanism keeps one).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, kind: str, *,
                 bias: bool = True) -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS} or None, got {kind!r}")
        self.kind, self.heads, self.head_dim = kind, heads, head_dim
        width = heads if kind == "headwise" else heads * head_dim
        self.proj = nn.Linear(dim, width, bias=bias)

    def forward(self, heads_out: Tensor, x: Tensor) -> Tensor:
        """``heads_out`` (B, L, H, D), ``x`` (B, L, C) -> gated (B, L, H, D)."""
        g = torch.sigmoid(self.proj(x))
        g = g.unsqueeze(-1) if self.kind == "headwise" else g.unflatten(-1, (self.heads,
                                                                            self.head_dim))
        return heads_out * g.to(heads_out.dtype)


class NoGate(nn.Module):
    """The gate slot of a module without ``gate=``: passes the head outputs through."""

    def forward(self, heads_out: Tensor, x: Tensor) -> Tensor:
        return heads_out


def make_gate(dim: int, heads: int, head_dim: int, kind: str | None, *,
              bias: bool = True) -> nn.Module:
    return NoGate() if kind is None else OutputGate(dim, heads, head_dim, kind, bias=bias)
