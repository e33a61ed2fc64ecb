"""Hook points: identity modules at the places a user may read or edit activations."""

from __future__ import annotations

from torch import Tensor, nn


class HookPoint(nn.Module):
    """An identity module. Attach ``register_forward_hook`` to read or replace its tensor.

    Named like TransformerLens' hook points, so ``attn.hook_q`` etc. can be hooked with plain
    PyTorch: a forward hook that returns a tensor replaces the value flowing through.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x

    @property
    def active(self) -> bool:
        """True when something is attached (used to materialise expensive tensors lazily)."""
        return bool(self._forward_hooks or self._forward_pre_hooks)
