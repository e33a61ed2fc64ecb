"""Official InLine checkpoints (LeapLabTHU/InLine ``InLineAttention``) into attnlab's ``inline``.

Layouts (keys relative to the attention module):

- ``"swin"`` (default; models/inline_swin.py, and the same keys in models/inline_deit.py):
  ``qkv.weight`` (3C, C), ``qkv.bias``, ``proj.weight``, ``proj.bias``, and the local module
  ``residual.0.weight`` (C, C/H, 1), ``residual.0.bias``, ``residual.2.weight`` (9C, C/H, 1),
  ``residual.2.bias``.
- ``"pvt"`` (models/inline_pvt.py with ``sr_ratio=1``, as its released configurations):
  ``q.weight``/``q.bias`` and ``kv.weight`` (2C, C)/``kv.bias`` instead of ``qkv``.

The shapes say everything: C from ``proj.weight``, the heads H from ``residual.0.weight``
(C / its second dimension), the qkv bias from its presence (a checkpoint built with
``qkv_bias=False`` gets q, k, v biases of 0: the same function, as attnlab's ``bias=``
switches all four projections). The official module computes its kernel feature map from a
constructor argument (``kernel_func``, ``identity`` in every released model), not a weight:
pass ``feature_map=`` ("relu", "leaky_relu", "exp") for another. Other keyword arguments go to
``attnlab.build`` (e.g. ``dropout``). DeiT's module skips the class token in the local
convolution, which attnlab's module (no class token) does not do: convert its weights, but
feed patch tokens only.

>>> attn = convert(swin_block_state, layout="swin")   # or from_official("inline", ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import attnlab as al
from attnlab.official._common import agree, hints_for, load_exactly, refuse_keys

LAYOUTS = ("swin", "pvt")
_LOCAL = {"local.hidden.weight": "residual.0.weight", "local.hidden.bias": "residual.0.bias",
          "local.kernel.weight": "residual.2.weight", "local.kernel.bias": "residual.2.bias"}
_HINTS = {"sr.": "key/value down-sampling (PVT sr_ratio > 1) is not supported",
          "norm.": "key/value down-sampling (PVT sr_ratio > 1) is not supported",
          "get_v.": "CSWin's InLine module (LePE, qkv from the block) is not this layout"}


def _sources(layout: str) -> tuple[dict[str, tuple[str, int, int]], tuple[str, ...]]:
    """attnlab parameter -> (official key, chunk, chunks) and the optional official keys."""
    if layout == "swin":
        fused = {f"qkv.{p}.{kind}": (f"qkv.{kind}", i, 3) for i, p in enumerate("qkv")
                 for kind in ("weight", "bias")}
        optional: tuple[str, ...]
        optional = ("qkv.bias",)
    else:
        fused = {f"qkv.q.{kind}": (f"q.{kind}", 0, 1) for kind in ("weight", "bias")}
        fused |= {f"qkv.{p}.{kind}": (f"kv.{kind}", i, 2) for i, p in enumerate("kv")
                  for kind in ("weight", "bias")}
        optional = ("q.bias", "kv.bias")
    fused |= {"o_proj.weight": ("proj.weight", 0, 1), "o_proj.bias": ("proj.bias", 0, 1)}
    fused |= {mine: (theirs, 0, 1) for mine, theirs in _LOCAL.items()}
    return fused, optional


def _check_keys(state_dict: Mapping[str, Tensor], layout: str) -> None:
    sources, optional = _sources(layout)
    known = {theirs for theirs, _, _ in sources.values()}
    unexpected = sorted(set(state_dict) - known)
    missing = sorted(known - set(state_dict) - set(optional))
    if [k for k in optional if k in state_dict] not in ([], list(optional)):
        missing += sorted(k for k in optional if k not in state_dict)
    refuse_keys(f"inline ({layout!r} layout)", unexpected, missing,
                hints_for(unexpected, _HINTS))


def _infer(state_dict: Mapping[str, Tensor], build_kwargs: dict[str, Any]) -> tuple[int, int]:
    """(dim, heads) from the shapes; a ``heads=`` or ``dim=`` given must agree."""
    proj, hidden = state_dict["proj.weight"], state_dict["residual.0.weight"]
    dim = proj.shape[0]
    if hidden.dim() != 3 or hidden.shape[1] < 1 or dim % hidden.shape[1]:
        raise ValueError(f"inline: residual.0.weight has shape {tuple(hidden.shape)}; "
                         f"expected (C, C / heads, 1) with C = {dim}")
    heads = dim // hidden.shape[1]
    agree("inline", {"dim": dim, "heads": heads}, build_kwargs,
          fixed=("bias", "local", "kv_heads", "head_dim"))
    return dim, heads


def _official_tensor(state_dict: Mapping[str, Tensor], key: str, chunk: int, chunks: int,
                     like: Tensor) -> Tensor:
    if key not in state_dict:  # an absent q/k/v bias (qkv_bias=False): zero, same function
        return torch.zeros_like(like)
    t = state_dict[key]
    if t.shape[0] % chunks:
        raise ValueError(f"inline: {key} has shape {tuple(t.shape)}, not {chunks} equal parts")
    t = t.chunk(chunks, 0)[chunk]
    if t.shape != like.shape:
        raise ValueError(f"inline: {key} gives shape {tuple(t.shape)} where "
                         f"{tuple(like.shape)} is needed")
    return t


def convert(state_dict: Mapping[str, Tensor], *, layout: str = "swin",
            **build_kwargs: Any) -> al.Attention:
    """attnlab's ``inline`` module holding the official ``InLineAttention`` weights of
    ``state_dict`` (keys relative to that module), in the official configuration (bias,
    local module; ``feature_map`` identity unless given), in the checkpoint's dtype."""
    if layout not in LAYOUTS:
        raise ValueError(f"inline: layout must be one of {LAYOUTS}, got {layout!r}")
    _check_keys(state_dict, layout)
    dim, heads = _infer(state_dict, build_kwargs)
    attn = al.build("inline", dim=dim, heads=heads, **build_kwargs)
    attn = attn.to(dtype=state_dict["proj.weight"].dtype)
    sources, _ = _sources(layout)
    own = dict(attn.named_parameters())
    return load_exactly("inline", attn, {
        mine: _official_tensor(state_dict, key, chunk, chunks, own[mine])
        for mine, (key, chunk, chunks) in sources.items() if mine in own})
