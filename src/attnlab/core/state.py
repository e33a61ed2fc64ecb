"""Decoding states: what a mechanism carries from one call to the next."""

from __future__ import annotations

import torch
from torch import Tensor


class State:
    """Base class of decoding states.

    ``position`` counts the tokens consumed so far (the absolute position of the next
    token). A state is bound to the module that created it (``owner``) and to a batch size.
    """

    def __init__(self, owner: str, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.owner = owner
        self.batch_size = batch_size
        self.position = 0

    def check(self, owner: str, batch: int) -> None:
        """Raise ``ValueError`` when this state cannot serve a call of ``owner`` with ``batch``."""
        if owner != self.owner:
            raise ValueError(f"this state was made by {self.owner!r}, not {owner!r}")
        if batch != self.batch_size:
            raise ValueError(
                f"{self.owner}: the state was created for batch_size={self.batch_size}, "
                f"got an input with batch size {batch}"
            )

    def nbytes(self) -> int:
        """Memory held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        return []

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(owner={self.owner!r}, batch_size={self.batch_size}, "
                f"position={self.position})")


class KVCache(State):
    """Key/value cache with amortised O(1) appends (capacity doubles when full).

    Stores keys and values with ``kv_heads`` heads, ``(B, H_kv, T, D)``, and the key padding
    mask ``(B, T)`` so that padded prompt tokens stay invisible while decoding.
    """

    def __init__(self, owner: str, batch_size: int, *, capacity: int = 64) -> None:
        super().__init__(owner, batch_size)
        self._capacity = max(1, capacity)
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._mask: Tensor | None = None

    def _grow(self, like_k: Tensor, like_v: Tensor, needed: int) -> None:
        cap = self._capacity
        while cap < needed:
            cap *= 2
        b, h, _, dk = like_k.shape
        dv = like_v.shape[-1]
        k = like_k.new_zeros(b, h, cap, dk)
        v = like_v.new_zeros(b, h, cap, dv)
        mask = torch.zeros(b, cap, dtype=torch.bool, device=like_k.device)
        if self._k is not None:
            n = self.position
            k[:, :, :n] = self._k[:, :, :n]
            v[:, :, :n] = self._v[:, :, :n]
            mask[:, :n] = self._mask[:, :n]
        self._k, self._v, self._mask, self._capacity = k, v, mask, cap

    def append(self, k: Tensor, v: Tensor, key_mask: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Append ``k, v`` of shape ``(B, H_kv, L, D)``; return all cached keys, values, mask."""
        n, l = self.position, k.shape[2]
        if self._k is None or n + l > self._capacity:
            self._grow(k, v, n + l)
        elif self._k.shape[1] != k.shape[1] or self._k.shape[-1] != k.shape[-1]:
            raise ValueError(f"{self.owner}: cache holds {tuple(self._k.shape)}, got keys "
                             f"{tuple(k.shape)}")
        # The cache stores values, not autograd history; the current chunk keeps its gradient.
        self._k[:, :, n:n + l] = k.detach()
        self._v[:, :, n:n + l] = v.detach()
        self._mask[:, n:n + l] = True if key_mask is None else key_mask
        self.position = end = n + l
        if k.requires_grad or v.requires_grad:
            return (torch.cat((self._k[:, :, :n], k), dim=2),
                    torch.cat((self._v[:, :, :n], v), dim=2), self._mask[:, :end])
        return self._k[:, :, :end], self._v[:, :, :end], self._mask[:, :end]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self._k, self._v, self._mask) if t is not None]

    def numbers_per_token(self) -> int:
        """Cached numbers per token (keys and values, all kv heads)."""
        if self._k is None:
            return 0
        return self._k.shape[1] * (self._k.shape[-1] + self._v.shape[-1])


class RecurrentState(State):
    """A state of fixed size (linear attention, SSM-like mechanisms): named tensors that each
    call replaces. Its memory does not grow with the number of tokens consumed."""

    def __init__(self, owner: str, batch_size: int) -> None:
        super().__init__(owner, batch_size)
        self._tensors: dict[str, Tensor] = {}

    def get(self, name: str) -> Tensor | None:
        return self._tensors.get(name)

    def update(self, tokens: int, **tensors: Tensor) -> None:
        """Store the new tensors (detached: a state carries values, not autograd history)."""
        self._tensors.update({k: t.detach() for k, t in tensors.items()})
        self.position += tokens

    def tensors(self) -> list[Tensor]:
        return list(self._tensors.values())
