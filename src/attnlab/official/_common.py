"""What every official-checkpoint converter does: refuse keys it does not know (or lacks),
reconcile the arguments the shapes imply with those given, and load exactly the module's
parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)  # load_exactly returns the module it was given


def refuse_keys(who: str, unexpected: Iterable[str], missing: Iterable[str],
                hints: Iterable[str] = ()) -> None:
    """Raise a ValueError naming ``who``, the unexpected and the missing keys and the hints,
    if there is any unexpected or missing key."""
    unexpected, missing = sorted(unexpected), sorted(missing)
    if not unexpected and not missing:
        return
    prefixes = sorted({k[:-len(m)] for k in unexpected for m in missing
                       if k.endswith("." + m)})
    if prefixes:  # a whole model's state dict: the attention module's keys are inside it
        hints = [f"the state dict holds the module under a prefix: pass prefix= (e.g. "
                 f"{prefixes[0]!r})", *hints]
        unexpected = unexpected[:5] + ([f"... {len(unexpected) - 5} more"]
                                       if len(unexpected) > 5 else [])
    parts = [f"unexpected keys {unexpected}" if unexpected else "",
             f"missing keys {missing}" if missing else "", *hints]
    raise ValueError(f"{who}: " + "; ".join(p for p in parts if p))


def check_biases(who: str, state_dict: Mapping[str, Tensor], layers: Iterable[str]) -> None:
    """Each ``<layer>.bias`` present has one entry per row of ``<layer>.weight`` (a longer one
    was cut silently, a shorter one failed with an IndexError)."""
    for layer in layers:
        w, b = state_dict.get(f"{layer}.weight"), state_dict.get(f"{layer}.bias")
        if w is not None and b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{who}: {layer}.bias has shape {tuple(b.shape)}; "
                             f"{layer}.weight {tuple(w.shape)} needs ({w.shape[0]},)")


def hints_for(keys: Iterable[str], hints: Mapping[str, str]) -> list[str]:
    """The hints whose key prefix starts one of ``keys``."""
    return sorted({h for k in keys for prefix, h in hints.items() if k.startswith(prefix)})


def _same(given: Any, value: Any) -> bool:
    if isinstance(given, list):
        given = tuple(given)
    if isinstance(value, tuple) and not isinstance(given, tuple):
        return all(v == given for v in value)  # one number for every axis
    return given == value


def agree(who: str, inferred: Mapping[str, Any], build_kwargs: dict[str, Any], *,
          fixed: Iterable[str] = ()) -> dict[str, Any]:
    """``inferred`` (what the shapes say) merged with ``build_kwargs``: an inferred argument
    also given must agree, and the ``fixed`` ones (set by the official layout) cannot be
    given. ``build_kwargs`` keeps only what the shapes do not say."""
    for name in fixed:
        if name in build_kwargs:
            raise ValueError(f"{who}: {name}= is set by the official module's layout, not an "
                             "argument of the conversion")
    for name, value in inferred.items():
        given = build_kwargs.pop(name, value)
        if not _same(given, value):
            raise ValueError(f"{who}: {name}={given!r} contradicts the state dict, whose "
                             f"shapes say {name}={value!r}")
    return dict(inferred)


def load_exactly(who: str, attn: M, weights: Mapping[str, Tensor]) -> M:
    """Copy ``weights`` (attnlab name -> tensor) into ``attn``, whose parameters must be
    exactly those names (the build arguments added none the official module lacks)."""
    own = dict(attn.named_parameters())
    extra, absent = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if extra or absent:
        raise ValueError(f"{who}: the build arguments add parameters the official module "
                         f"does not have: {extra}"
                         + (f"; not in the module built: {absent}" if absent else ""))
    with torch.no_grad():
        for name, t in weights.items():
            if t.shape != own[name].shape:
                raise ValueError(f"{who}: {name} needs shape {tuple(own[name].shape)}, the "
                                 f"state dict gives {tuple(t.shape)}")
            own[name].copy_(t)
    return attn
