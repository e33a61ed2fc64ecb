"""The decoding state: what a mechanism carries from one call to the next.

One type serves every mechanism: named tensors that either grow along the token axis
(``append``: a KV cache, a padding mask) or are replaced whole (``put``: a linear-attention
prefix sum, a convolution's last inputs). ``position`` counts the tokens consumed; only
``Attention.forward`` advances it, once per call, after the mechanism has run. Every entry
holds the batch along dim 0, so ``select`` reorders, subsets or repeats the sequences of a
state (beam search) whatever the mechanism.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor


class State:
    """Named decoding tensors of one module and one batch.

    A state is bound to the module that created it (``owner``) and to a batch size. Growing
    entries keep spare capacity (doubling when full), so appending a token is amortised
    O(1); their values are stored detached, while the chunk just appended keeps its
    gradient in what ``append`` returns.
    """

    def __init__(self, owner: str, batch_size: int, *, capacity: int = 64,
                 module: object | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.owner = owner
        # the module instance that made it (weakly): another module, even of the same
        # mechanism, has other heads, widths or layers, and must not read this cache
        self._module = None if module is None else weakref.ref(module)
        self._made_for = _parameter_kind(module)  # the module's dtype and device then
        self.batch_size = batch_size
        self.position = 0
        self._initial_capacity = max(1, capacity)
        self._fixed: dict[str, Tensor] = {}
        self._growing: dict[str, tuple[Tensor, int, int]] = {}  # name -> (buffer, dim, length)

    def check(self, owner: str, batch: int, module: object | None = None) -> None:
        """Raise ``ValueError`` when this state cannot serve a call of ``owner`` (the module
        ``module``) with ``batch`` sequences."""
        if owner != self.owner:
            raise ValueError(f"this state was made by {self.owner!r}, not {owner!r}")
        if module is not None and self._module is not None and self._module() is not module:
            raise ValueError(f"{owner}: this state was made by another {self.owner!r} module; "
                             "each attention module (each layer) needs its own state from "
                             "its own new_state()")
        if batch != self.batch_size:
            raise ValueError(
                f"{self.owner}: the state was created for batch_size={self.batch_size}, "
                f"got an input with batch size {batch}"
            )
        now = _parameter_kind(module)
        if module is not None and self._made_for is not None and now != self._made_for:
            assert now is not None  # differs from a kind that is not None
            raise ValueError(f"{owner}: the state was made when the module's parameters were "
                             f"{self._made_for[0]} on {self._made_for[1]}, they are now "
                             f"{now[0]} on {now[1]}; its tensors are of the old kind: start "
                             "a new state with new_state() after module.to(...)")

    # ------------------------------------------------------------------ fixed-size entries
    def get(self, name: str) -> Tensor | None:
        """A fixed-size entry (``put``), or all of a growing one so far; None if absent."""
        if name in self._fixed:
            return self._fixed[name]
        if name in self._growing:
            buffer, dim, length = self._growing[name]
            return buffer.narrow(dim, 0, length)
        return None

    def put(self, **tensors: Tensor) -> None:
        """Replace fixed-size entries (stored detached: a state carries values, not history)."""
        self._fixed.update({k: t.detach() for k, t in tensors.items()})

    # --------------------------------------------------------------------- growing entries
    def append(self, name: str, t: Tensor, dim: int) -> Tensor:
        """Append ``t`` along ``dim`` to the entry ``name``; return the whole entry so far."""
        dim = dim % t.dim()
        if name not in self._growing:
            self._growing[name] = (self._allocate(t, dim, t.shape[dim]), dim, 0)
        buffer, known_dim, length = self._growing[name]
        if known_dim != dim or buffer.shape[:dim] != t.shape[:dim] or \
                buffer.shape[dim + 1:] != t.shape[dim + 1:]:
            raise ValueError(f"{self.owner}: state entry {name!r} holds "
                             f"{tuple(buffer.shape)} along dim {known_dim}, got "
                             f"{tuple(t.shape)} along dim {dim}")
        end = length + t.shape[dim]
        if end > buffer.shape[dim]:
            grown = self._allocate(buffer, dim, end)
            grown.narrow(dim, 0, length).copy_(buffer.narrow(dim, 0, length))
            buffer = grown
        buffer.narrow(dim, length, t.shape[dim]).copy_(t.detach())
        self._growing[name] = (buffer, dim, end)
        if t.requires_grad:  # the new chunk keeps its gradient
            return torch.cat((buffer.narrow(dim, 0, length), t), dim=dim)
        whole = buffer.narrow(dim, 0, end)
        # the next append writes into this buffer: a tensor autograd may save for the
        # backward (a key mask) gets a copy, or backward() after two steps fails
        return whole.clone() if torch.is_grad_enabled() else whole

    def _allocate(self, like: Tensor, dim: int, needed: int) -> Tensor:
        capacity = max(self._initial_capacity, like.shape[dim])
        while capacity < needed:
            capacity *= 2
        shape = list(like.shape)
        shape[dim] = capacity
        return like.new_zeros(shape)

    # ------------------------------------------------------------------------ batch rows
    def select(self, index: Tensor | Sequence[int]) -> None:
        """Keep, reorder or repeat the state's sequences in place: sequence ``i`` becomes the
        old sequence ``index[i]`` (beam search's reordering, a subset of the batch, or each
        sequence repeated). ``index`` is 1-D of integers in ``[0, batch_size)``, on any
        device; the batch size becomes ``len(index)``. Every entry, fixed or growing, holds
        the batch along dim 0; growing entries keep their length and capacity."""
        rows = self.batch_index(index)
        for name, t in self._fixed.items():
            self._fixed[name] = t.index_select(0, rows.to(t.device))
        for name, (buffer, dim, length) in self._growing.items():
            self._growing[name] = (buffer.index_select(0, rows.to(buffer.device)), dim, length)
        self.batch_size = rows.numel()

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence ``repeats`` times in place (0, 0, 1, 1, ... for 2):
        ``select`` of the index ``torch.arange(batch_size).repeat_interleave(repeats)``."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"{self.owner}: repeats must be an int >= 1, got {repeats!r}")
        self.select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_index(self, index: Tensor | Sequence[int]) -> Tensor:
        """``index`` checked for ``select`` (ValueError otherwise), as a 1-D long tensor."""
        rows = index if isinstance(index, Tensor) else torch.as_tensor(index)
        if rows.numel() == 0:
            raise ValueError(f"{self.owner}: a state's rows are selected by a non-empty 1-D "
                             "integer index, got an empty one")
        if rows.dim() != 1 or rows.dtype == torch.bool \
                or rows.is_floating_point() or rows.is_complex():
            raise ValueError(f"{self.owner}: a state's rows are selected by a non-empty 1-D "
                             f"integer index, got {rows.dtype} of shape {tuple(rows.shape)}")
        outside = (rows < 0) | (rows >= self.batch_size)
        if bool(outside.any()):
            raise ValueError(f"{self.owner}: the index selects row "
                             f"{int(rows[outside][0])} of a state of {self.batch_size} "
                             f"sequences (rows 0..{self.batch_size - 1})")
        # checked before any entry changes: a refused select leaves the state as it was
        entries = [*self._fixed.items(), *((n, b) for n, (b, _, _) in self._growing.items())]
        for name, t in entries:
            if t.dim() == 0 or t.shape[0] != self.batch_size:
                raise ValueError(f"{self.owner}: state entry {name!r} of shape "
                                 f"{tuple(t.shape)} does not hold the batch of "
                                 f"{self.batch_size} along dim 0, so its rows cannot be "
                                 "selected")
        for name, (_, dim, _) in self._growing.items():
            if dim == 0:  # append(dim=0) of a batch of one
                raise ValueError(f"{self.owner}: state entry {name!r} grows along dim 0, "
                                 "where select expects the batch")
        return rows.long()

    # ------------------------------------------------------------------------- bookkeeping
    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more consumed tokens (``Attention.forward`` calls this once)."""
        self.position += tokens

    def tensors(self) -> list[Tensor]:
        return [*self._fixed.values(), *(b for b, _, _ in self._growing.values())]

    def nbytes(self) -> int:
        """Memory held by the state's tensors (growing entries with their spare capacity)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def numbers_per_token(self, *names: str) -> int:
        """Numbers stored per token in the growing entries ``names`` (all of them by default),
        e.g. ``numbers_per_token("k", "v")`` is the KV cache's size per token."""
        total = 0
        for name, (buffer, dim, _) in self._growing.items():
            if not names or name in names:
                total += buffer.numel() // buffer.shape[dim]
        return total // self.batch_size

    def __repr__(self) -> str:
        entries = sorted([*self._fixed, *self._growing])
        return (f"State(owner={self.owner!r}, batch_size={self.batch_size}, "
                f"position={self.position}, entries={entries})")


def _parameter_kind(module: object | None) -> tuple[torch.dtype, torch.device] | None:
    """(dtype, device) of the module's first floating-point parameter (None: none)."""
    params = getattr(module, "parameters", None)
    if params is None:
        return None
    first = next((p for p in params() if p.is_floating_point()), None)
    return None if first is None else (first.dtype, first.device)
