"""FlexAttention helpers (``torch.nn.attention.flex_attention``), the CUDA / inference path.

Mechanisms that are not a softmax are written as one: ``score_mod`` returns the log of the
unnormalised weight, FlexAttention normalises, and the log-sum-exp it returns undoes the
normalisation where needed. On CPU, torch's FlexAttention has no backward and its compiled
CPU kernel does not return the log-sum-exp, so the CPU default is the tiled backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor


@functools.cache
def compiled_flex() -> Callable:
    """``flex_attention`` compiled once per process (also the bench's Flex contestants)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_for(device: torch.device) -> Callable:
    """Compiled FlexAttention on CUDA; the eager (unfused reference) one elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    return compiled_flex() if device.type == "cuda" else cast(Callable, flex_attention)


def _mask_mod(causal: bool, offset: int, mask: Tensor | None) -> Callable | None:
    if not causal and mask is None:
        return None

    def mod(b, h, q_idx, kv_idx):
        keep = (kv_idx <= q_idx + offset) if causal else (kv_idx >= 0)
        if mask is not None:
            keep = keep & mask[b, h, q_idx, kv_idx]
        return keep

    return mod


@functools.lru_cache(maxsize=32)
def _causal_block_mask(lq: int, lk: int, device: str):
    """The end-aligned causal block mask, broadcast over batch and heads (building one costs
    about as much as a short attention call, so it is cached per shape and device)."""
    return block_mask_of(cast(Callable, _mask_mod(True, lk - lq, None)), None, None, lq, lk,
                         device)


def flex_call(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None,
              score_mod: Callable | None, scale: float, return_lse: bool = False):
    """Run FlexAttention with a causal (end-aligned) and/or boolean mask.

    ``q``, ``k``, ``v`` have expanded heads. Compiled on CUDA; eager elsewhere (eager is the
    unfused reference path of FlexAttention, used by the tests to check ``score_mod`` math).
    """
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    block_mask = None
    if mask is None and causal:  # the same for every batch and head: built once, kept
        block_mask = _causal_block_mask(lq, lk, str(q.device))
    elif mask is not None:
        mod = _mask_mod(causal, lk - lq, mask.expand(b, h, lq, lk))
        assert mod is not None  # a mask was given
        block_mask = block_mask_of(mod, b, h, lq, lk, q.device)
    fn = _flex_for(q.device)
    if not return_lse:
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    try:  # torch >= 2.9 spells it return_aux; return_lse is deprecated there
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  return_lse=True)
    out, aux = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  return_aux=AuxRequest(lse=True))
    return out, aux.lse


def block_mask_of(mask_mod: Callable, b: int | None, h: int | None, lq: int, lk: int,
                  device) -> object:
    """FlexAttention's block mask of ``mask_mod`` (compiled on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, b, h, lq, lk, device=device,
                             _compile=str(device).startswith("cuda"))


def flex_masked(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                mask_mod: Callable | None = None, block_mask=None) -> Tensor:
    """Softmax FlexAttention restricted by ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (or by a
    ``block_mask`` built from one before); the block mask lets the kernel skip key blocks no
    query of a block can see. ``q``, ``k``, ``v`` are (B, H, L, D) with expanded heads."""
    b, h, lq, _ = q.shape
    if block_mask is None:
        if mask_mod is None:
            raise ValueError("flex_masked needs a mask_mod or a block_mask")
        block_mask = block_mask_of(mask_mod, b, h, lq, k.shape[2], q.device)
    fn = _flex_for(q.device)
    return fn(q, k, v, block_mask=block_mask, scale=scale)
