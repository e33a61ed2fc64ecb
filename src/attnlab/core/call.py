"""What one forward call of a mechanism knows besides q, k and v, and the head shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from attnlab.core.masks import key_padding_to_op
from attnlab.core.state import State


@dataclass(frozen=True)
class HeadShape:
    """The widths a mechanism's parts are built for.

    ``dim``: model width C; ``heads`` / ``kv_heads``: query and key-value heads; ``head_dim``:
    per-head width of v and of the output; ``qk_dim``: per-head width of q and k (usually
    ``head_dim``); ``bias``: biases in the projections.
    """

    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_dim: int
    bias: bool


@dataclass
class Call:
    """Everything one forward call knows besides q, k, v (passed to every step)."""

    x: Tensor  # (B, L, C): the block input, flattened to a sequence
    # (L,) or (B, L): the queries' absolute positions, 0-based, as position encodings read
    # them (RoPE, selective's temperature): ``positions=`` of the forward when given (per row
    # for a left-padded batch), else ``index``
    positions: Tensor
    key_mask: Tensor | None  # (B, Lk): True = real key (all cached keys after a state update)
    spatial: tuple[int, ...] | None  # (H, W) or (T, H, W) when the input is an image / video
    state: State | None
    context: Tensor | None  # (B, Lk, C) for cross-attention
    # (B, Lk): real (unpadded) tokens of x, or of the context, that held a non-finite number
    # (they were set to 0 before the projections; see Attention.nonfinite_reach)
    nonfinite: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # what a mechanism's steps share
    # (L,): where the queries sit in the sequence, the state's position + 0 .. L-1 (None: the
    # same as ``positions``); read through ``index``
    sequence_index: Tensor | None = None

    @property
    def index(self) -> Tensor:
        """(L,): the queries' places in the sequence (the keys of a state before them), what
        the causal order, windows, chunks and relative distances are counted in; ``positions``
        only differs when the forward was given ``positions=``."""
        return self.positions if self.sequence_index is None else self.sequence_index

    @property
    def op_mask(self) -> Tensor | None:
        """The key padding mask in op layout, ``(B, 1, 1, Lk)``."""
        return key_padding_to_op(self.key_mask)

    @property
    def source(self) -> Tensor:
        """What keys and values are projected from: the context, or x itself."""
        return self.x if self.context is None else self.context
