"""The attention layers of a model, as the microscope sees them: one ``Site`` per layer.

A site is an ``attnlab.Attention`` module, or the ``HeadSite`` that ``integrations.hf``
attaches to each attention module of a Hugging Face model. Both have the same hook points
(``hook_q``, ``hook_k``, ``hook_v``, ``hook_weights``, ``hook_heads``) and a ``head_scale``
of ones, so every method in ``attnlab.heads`` works on either.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from attnlab.core.hooks import HEAD_HOOKS, HeadSite

if TYPE_CHECKING:
    from attnlab.mechanisms.base import Attention

POINTS = tuple(name.removeprefix("hook_") for name in HEAD_HOOKS)  # q k v weights heads
HeadSelection = Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]


@dataclass(frozen=True)
class Site:
    """One attention layer: ``layer`` (its index, in model order), ``path`` (the module's
    name in the model), ``module`` (what carries the hook points and ``head_scale``) and
    ``causal`` (queries see only earlier keys), ``kind``: ``"self"`` or ``"cross"``
    (attention to another sequence, e.g. an encoder-decoder's decoder reading the encoder).

    Layers are numbered in model order over every attention module: in an encoder-decoder
    the encoder's self-attention layers come first, then each decoder block's self- and
    cross-attention in turn (``str(site)`` names one unambiguously, e.g.
    ``L3 = decoder.block.0.layer.1.EncDecAttention (cross)``)."""

    layer: int
    path: str
    module: Attention | HeadSite
    causal: bool
    kind: str = "self"

    @property
    def heads(self) -> int:
        return int(self.module.head_scale.numel())

    def hook(self, point: str) -> nn.Module:
        return getattr(self.module, f"hook_{point}")

    def __str__(self) -> str:
        owner = self.path.removesuffix(".attnlab_site")
        return f"L{self.layer} = {owner or type(self.module).__name__} ({self.kind})"


def sites(model: nn.Module) -> list[Site]:
    """The model's attention layers in order; ValueError when it has none attnlab can reach."""
    from attnlab.mechanisms.base import Attention

    found: list[Site] = []
    for path, module in model.named_modules():
        if isinstance(module, Attention):
            found.append(Site(len(found), path, module, bool(module.causal)))
        elif isinstance(module, HeadSite):  # causality is the HF attention module's
            owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
            found.append(Site(len(found), path, module,
                              bool(getattr(owner, "is_causal", False)),
                              str(getattr(module, "kind", "self"))))
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention attnlab can reach: its "
                         "layers are not attnlab.Attention modules, and it was not prepared "
                         "with attnlab.integrations.hf.use_attnlab")
    return found


def point_names(model_sites: list[Site]) -> list[str]:
    """Every hook name of the model: ``L<layer>.<point>`` (e.g. ``L0.weights``)."""
    return [f"L{s.layer}.{p}" for s in model_sites for p in POINTS]


def parse_point(name: str, model_sites: list[Site]) -> tuple[Site, str]:
    """``"L3.weights"`` -> (site 3, "weights"); ValueError suggesting close names."""
    layer, _, point = name.partition(".")
    known = point_names(model_sites)
    if name in known:
        return model_sites[int(layer[1:])], point
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        f"; names are L<layer>.<point>, layer 0..{len(model_sites) - 1}, point one of " \
        f"{', '.join(POINTS)}"
    raise ValueError(f"no hook point {name!r}{hint}")


def head_pairs(selection: HeadSelection, model_sites: list[Site]) -> list[tuple[int, int]]:
    """``{layer: [heads]}`` or ``[(layer, head), ...]`` as checked (layer, head) pairs."""
    pairs = ([(int(layer), int(h)) for layer, hs in selection.items() for h in hs]
             if isinstance(selection, Mapping) else [(int(a), int(b)) for a, b in selection])
    for layer, head in pairs:
        if not 0 <= layer < len(model_sites):
            raise ValueError(f"layer {layer} out of range: the model has {len(model_sites)} "
                             f"attention layers (0..{len(model_sites) - 1})")
        n = model_sites[layer].heads
        if not 0 <= head < n:
            raise ValueError(f"head {head} out of range in layer {layer}, which has {n} heads "
                             f"(0..{n - 1})")
    return pairs


def by_layer(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """(layer, head) pairs grouped by layer, heads sorted."""
    out: dict[int, list[int]] = {}
    for layer, head in pairs:
        out.setdefault(layer, []).append(head)
    return {layer: sorted(set(hs)) for layer, hs in sorted(out.items())}


@contextlib.contextmanager
def forward_hooks(model_sites: list[Site], point: str,
                  hooks: Mapping[int, Callable[..., object]]) -> Iterator[None]:
    """Inside the block, ``hooks[layer]`` is a forward hook on that layer's ``hook_<point>``
    (its return value replaces the tensor); every hook is removed when the block ends.

    The hooks are edits: they run before the hooks already there (``prepend``), so that a
    ``capture`` around the block records what flows on, edited, whichever block was entered
    first."""
    handles = []
    try:
        for layer, hook in hooks.items():
            handles.append(model_sites[layer].hook(point).register_forward_hook(hook,
                                                                                prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
