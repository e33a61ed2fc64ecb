"""Pieces every model shares: the pre-norm block and per-layer argument broadcasting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
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


BRANCH_PLACES = ("before", "after")


def residual_branches(attn: nn.Module) -> dict[str, nn.Module]:
    """The residual branches a mechanism contributes to its block: its optional
    ``residual_branches()`` returns new modules by place, ``"before"`` (added ahead of the
    attention branch) and ``"after"`` (added after it, ahead of the MLP); each is called as
    ``branch(x, mask)`` on the block's running input and returns what is added to it (a
    pre-norm, if any, is part of the branch). None: no branch."""
    make = getattr(attn, "residual_branches", None)
    branches = dict(make()) if callable(make) else {}
    unknown = set(branches) - set(BRANCH_PLACES)
    if unknown:
        raise ValueError(f"{type(attn).__name__}: residual branches at {sorted(unknown)}; "
                         f"the places are {BRANCH_PLACES}")
    return branches


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); a mechanism's residual branches (see
    :func:`residual_branches`), if it has any, are added before and after the attention
    branch: x + before(x), x + attn(norm(x)), x + after(x), x + mlp(norm(x)).

    ``mlp_ratio=0`` makes an attention-only block: no MLP and no second norm, so the block is
    x + attn(norm(x)) (with the residual branches, if any); ``mlp`` and ``norm2`` are then
    None. The attention-only models of the interpretability literature (two layers, attention
    only: the induction-head circuit) are built this way."""

    def __init__(self, dim: int, heads: int, mechanism: str, kwargs: dict, mlp_ratio: int,
                 dropout: float) -> None:
        super().__init__()
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, int) or mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be an integer >= 0 (0: attention only, no "
                             f"MLP), got {mlp_ratio!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = build(mechanism, dim=dim, heads=heads, **kwargs)
        for place, branch in residual_branches(self.attn).items():
            setattr(self, place, branch)  # only mechanisms with branches get these modules
        self.norm2: nn.LayerNorm | None = None
        self.mlp: nn.Sequential | None = None
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                     nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None) -> Tensor:
        if isinstance(mask, Tensor) and mask.dtype == torch.bool and \
                tuple(mask.shape) == tuple(x.shape[:-1]):
            # padded tokens are 0 before the norms and the MLP too (contract: padding may hold
            # anything; a NaN row there made every weight gradient NaN through 0 x NaN)
            x = x.masked_fill(~mask.unsqueeze(-1), 0)
        before, after = (getattr(self, place, None) for place in BRANCH_PLACES)
        if state is not None and (before is not None or after is not None):
            raise ValueError(f"{self.attn.name}: its block's residual branches see the whole "
                             "input; they do not decode with a state")
        if before is not None:
            x = x + before(x, mask)
        x = x + self.attn(self.norm1(x), mask=mask, state=state)
        if after is not None:
            x = x + after(x, mask)
        if self.mlp is None or self.norm2 is None:
            return x  # attention only
        return x + self.mlp(self.norm2(x))


def sum_extra_losses(modules, like: Tensor) -> Tensor:
    """Sum of ``extra_loss()`` of attention modules (a 0-d tensor like ``like``)."""
    return sum((m.extra_loss() for m in modules), like.new_zeros(()))
