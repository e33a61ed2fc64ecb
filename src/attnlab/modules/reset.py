"""Re-initialising a module as its constructor did (meta-device / FSDP-style initialisation).

A module built under ``torch.device("meta")`` and materialised with ``to_empty()`` holds
uninitialised memory; ``reset_parameters()`` then re-creates every parameter and buffer. Each
part that initialises something itself defines ``reset_parameters()``; a container without
one resets its children in registration order, which is the order the constructor created
them in, so a reset after ``torch.manual_seed(s)`` draws the same random numbers as a build
after ``torch.manual_seed(s)`` (docs/contract.md, "Meta-device initialisation").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def reset_module(module: nn.Module) -> None:
    """``module.reset_parameters()`` where it has one, else each child's, in order."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
    else:
        reset_children(module)


def reset_children(module: nn.Module) -> None:
    """Reset every child of ``module`` (not ``module`` itself) in registration order."""
    for child in module.children():
        reset_module(child)


def replay_draws(build: Callable[[], object], like: torch.Tensor) -> None:
    """Build and drop a part on ``like``'s device: the random numbers a constructor drew for
    a part it then replaced, drawn again so that a seeded reset stays in step with a seeded
    build (nothing is drawn on the meta device, as nothing was when building there)."""
    if like.is_meta:
        return
    with torch.device(like.device):
        build()
