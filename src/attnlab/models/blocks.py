"""Pieces every model shares: the pre-norm block and per-layer argument broadcasting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from attnlab.core.registry import build, info
from attnlab.core.state import State


def per_layer(value: Any, depth: int, what: str) -> list:
    """Broadcast one value to ``depth`` layers, or check a per-layer list."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{what}: got {len(value)} entries for depth={depth}")
        return list(value)
    return [value] * depth


HYBRID_SEPARATOR = "+"


def hybrid_layers(mechanism: str) -> list[str]:
    """The per-layer names of a hybrid written as one string, ``"softmax+linear"`` (layer 0
    softmax, layer 1 linear); a plain name is one entry."""
    return [part.strip() for part in mechanism.split(HYBRID_SEPARATOR)]


def layer_specs(mechanism: str | Sequence[str], mechanism_kwargs: dict | Sequence[dict] | None,
                depth: int) -> list[tuple[str, dict]]:
    """(name, kwargs) per layer; every name is checked against the registry. ``mechanism``:
    one name for every layer, one per layer, or per-layer names joined by ``+``."""
    if isinstance(mechanism, str) and HYBRID_SEPARATOR in mechanism:
        mechanism = hybrid_layers(mechanism)
    names = per_layer(mechanism, depth, "mechanism")
    kwargs = per_layer(mechanism_kwargs or {}, depth, "mechanism_kwargs")
    for name in names:
        info(name)  # raises a ValueError that lists the registered names
    return [(n, dict(kw)) for n, kw in zip(names, kwargs, strict=True)]


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mechanism: str, kwargs: dict, mlp_ratio: int,
                 dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build(mechanism, dim=dim, heads=heads, **kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, state=state)
        return x + self.mlp(self.norm2(x))


def sum_extra_losses(modules, like: Tensor) -> Tensor:
    """Sum of ``extra_loss()`` of attention modules (a 0-d tensor like ``like``)."""
    return sum((m.extra_loss() for m in modules), like.new_zeros(()))
