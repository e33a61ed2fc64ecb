"""Official checkpoints into attnlab modules: ``from_official(mechanism, state_dict, ...)``.

Each converter lives in ``attnlab.official.<mechanism>`` (imported on first use) and exposes
``convert(state_dict, *, layout, **build_kwargs) -> Attention``: it reads the official
attention module's parameters (keys relative to that module), infers what the shapes say
(width, heads, ...), builds the attnlab module with the official configuration and loads
the mapped weights, refusing keys it does not know with an error that names them.

>>> import attnlab.official as official
>>> attn = official.from_official("gated", qwen3_layer_state, prefix="self_attn.",
...                               layout="qwen3", heads=16, kv_heads=8)
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["available", "from_official"]


def available() -> tuple[str, ...]:
    """The mechanisms that have an official-checkpoint converter."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_")))


def from_official(mechanism: str, state_dict: Mapping[str, Tensor], *, prefix: str = "",
                  **kwargs: Any):
    """The attnlab ``mechanism`` module holding the official weights in ``state_dict``.

    ``prefix``: take only the keys that start with it (the attention module's path inside a
    whole model's checkpoint, e.g. ``"stages.0.blocks.0.attn_block.attn."``), stripped.
    ``kwargs`` go to the mechanism's converter (its ``layout`` and what the shapes do not
    say, e.g. ``heads``); see each converter's docstring.
    """
    if mechanism not in available():
        raise ValueError(f"no official-checkpoint converter for {mechanism!r}; "
                         f"converters exist for {', '.join(available())}")
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"no key of the state dict starts with {prefix!r}")
    module = importlib.import_module(f"attnlab.official.{mechanism}")
    return module.convert(dict(state_dict), **kwargs)
