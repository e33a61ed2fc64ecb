"""A converted decoder's entry in a transformers ``DynamicCache``: the layer's attnlab decoding
state in place of keys and values (see :mod:`attnlab.integrations.convert`, "The cache")."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from attnlab.core.state import State

__all__ = ["StateCacheLayer", "cache_slot", "state_layer_type"]


class StateCacheLayer:
    """A converted layer's entry in a transformers ``DynamicCache``: the layer's attnlab
    decoding state (``state``, None before the first call) and the key padding of the tokens it
    holds (``padding``, (B, tokens) bool, True = real; None while every token is real).

    It takes the place of the layer's empty ``DynamicLayer`` on the layer's first call with the
    cache, and answers what transformers asks a cache layer: its length (``get_seq_length``:
    the tokens the state has consumed, from which ``generate`` and the model compute the new
    tokens' positions and masks), the mask sizes, and the batch operations: reordering the
    sequences for beam search (``reorder_cache``), keeping some of them
    (``batch_select_indices``) and repeating each (``batch_repeat_interleave``), which select
    the rows of the state (:meth:`~attnlab.core.state.State.select`) and of the padding
    together; before the first call there is nothing to select. What an attnlab state cannot
    do is refused: keys written by a transformers attention (``update``) and cropping (rolling
    back tokens: a linear mechanism keeps a summary of them, not the tokens), so the cache is
    not croppable (``is_croppable = False``) and assisted or speculative decoding is refused
    by ``generate`` itself."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False  # nothing to allocate before the first call

    def __init__(self, *, is_sliding: bool = False, who: str = "a converted layer") -> None:
        super().__init__()  # CacheLayerMixin's, in the class transformers sees
        self.who = who  # the model, mechanism and layer, for messages
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.is_sliding = is_sliding
        self.is_initialized = False
        self.state: State | None = None
        self.padding: Tensor | None = None

    def __repr__(self) -> str:
        return f"StateCacheLayer({self.state!r})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to allocate: the state is made by the layer's first call."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{self.who}: a transformers attention module wrote keys into this "
                         "converted layer's cache entry (a cache shared between a converted "
                         "and an unconverted model?)")

    def get_seq_length(self) -> int:
        """The tokens the state has consumed."""
        return 0 if self.state is None else int(self.state.position)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(key length, key offset) of the mask transformers builds: every consumed token."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        """Kept where it is (a state is small, or a KV cache the mechanism owns)."""

    def prefetch(self) -> None:
        """Nothing offloaded, nothing to fetch."""

    def reset(self) -> None:
        """Forget the state (the next call starts a new sequence)."""
        self.state, self.padding, self.is_initialized = None, None, False

    def _refuse(self, what: str) -> None:
        if self.state is not None:
            raise ValueError(f"{self.who}: {what} is not supported with an attnlab "
                             "decoding state (its tensors are the mechanism's own, a summary "
                             "for a linear mechanism, and cannot be rolled back): generate "
                             "with use_cache=False")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Reorder the sequences for beam search: sequence ``i`` continues the old sequence
        ``beam_idx[i]`` (state and padding)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the sequences ``indices`` (1-D integer index into the batch, in that order,
        a sequence possibly more than once); nothing to do before the state exists."""
        if self.state is None:
            return
        rows = self.state.batch_index(indices)  # checked before anything changes
        if self.padding is not None and self.padding.shape[0] != self.state.batch_size:
            raise ValueError(f"{self.who}: the cached padding holds {self.padding.shape[0]} "
                             f"sequences, the state {self.state.batch_size}")
        self.state.select(rows)
        if self.padding is not None:
            self.padding = self.padding.index_select(0, rows.to(self.padding.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence ``repeats`` times in place (a, a, b, b for 2)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"{self.who}: repeats must be an int >= 1, got {repeats!r}")
        if self.state is not None and repeats != 1:
            self.batch_select_indices(
                torch.arange(self.state.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            self._refuse(f"cropping {abs(tokens_to_remove)} tokens from the cache (assisted "
                         "or speculative decoding)")


@functools.cache
def state_layer_type() -> type:
    """``StateCacheLayer`` as a transformers ``CacheLayerMixin`` (built on first use, so
    that this module imports without transformers)."""
    from transformers.cache_utils import CacheLayerMixin

    return type("StateCacheLayer", (StateCacheLayer, CacheLayerMixin),
                {"__doc__": StateCacheLayer.__doc__, "__module__": __name__})


def cache_slot(cache: Any, layer_idx: int, who: str) -> StateCacheLayer:
    """The entry of layer ``layer_idx`` in a transformers cache: the ``StateCacheLayer`` put
    there by an earlier call, or a new one in place of the layer's empty entry."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise ValueError(f"{who}: a converted layer keeps its attnlab state in a DynamicCache "
                         f"(the default of generate), got {type(cache).__name__} (a static "
                         "or quantized cache holds keys and values the mechanism does not "
                         "make): pass no cache_implementation, or use_cache=False")
    layers = cache.layers
    if len(layers) <= layer_idx:
        make = cache.layer_class_to_replicate
        if make is None:
            raise ValueError(f"{who}: the cache has {len(layers)} layers, not layer "
                             f"{layer_idx}")
        while len(layers) <= layer_idx:
            layers.append(make())
    entry = layers[layer_idx]
    if isinstance(entry, StateCacheLayer):
        return entry
    if not isinstance(entry, DynamicLayer) or entry.get_seq_length() > 0:
        raise ValueError(f"{who}: the cache's entry for this layer is a "
                         f"{type(entry).__name__} holding {entry.get_seq_length()} tokens, "
                         "not a converted layer's state (a cache filled by another model?)")
    slot = state_layer_type()(is_sliding=bool(getattr(entry, "is_sliding", False)), who=who)
    layers[layer_idx] = slot
    return slot
