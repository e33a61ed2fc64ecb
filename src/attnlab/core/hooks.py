"""Hook points: identity modules at the places a user may read or edit activations."""

from __future__ import annotations

import torch
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


HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_weights", "hook_heads")


class HeadSite(nn.Module):
    """The hook points and ``head_scale`` of an attention layer whose module attnlab does not
    own (a Hugging Face model's): the same names and shapes as on ``attnlab.Attention``
    (``hook_q`` (B, H, Lq, D), ``hook_k``/``hook_v`` (B, H_kv, Lk, D), ``hook_weights``
    (B, H, Lq, Lk), ``hook_heads`` (B, Lq, H, D), before ``head_scale`` and the model's own
    output projection). ``integrations.hf`` attaches one to each attention module."""

    head_scale: Tensor  # made by register_buffer / add_module in __init__
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_weights: HookPoint
    hook_heads: HookPoint

    def __init__(self, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.register_buffer("head_scale", torch.ones(heads))
        for name in HEAD_HOOKS:
            self.add_module(name, HookPoint())

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}"
