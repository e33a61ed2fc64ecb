"""timm's MaxViT attention (``AttentionCl`` / ``Attention2d`` of timm/models/maxxvit.py)
into an attnlab ``maxvit`` module.

Layouts: ``"timm"`` (timm's own MaxViT models, ``head_first=True``: the fused ``qkv`` rows are
per head that head's q, k and v rows; ``RelPosBias`` table ((2P-1)^2, heads) over the
query-minus-key offset) and ``"tf"`` (the models ported from the TensorFlow checkpoints,
``head_first=False``: all q rows, then k, then v; ``RelPosBiasTf`` table (heads, 2P-1, 2P-1)
over the key-minus-query offset, i.e. attnlab's table flipped on both axes).

>>> attn = from_official("maxvit", timm_model.state_dict(), layout="tf", axis="grid",
...                      prefix="stages.0.blocks.0.attn_grid.attn.")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import attnlab as al
from attnlab.mechanisms.base import Attention
from attnlab.official._common import agree, check_biases, load_exactly, refuse_keys

LAYOUTS = ("timm", "tf")
TABLE = "rel_pos.relative_position_bias_table"
REQUIRED = ("qkv.weight", "proj.weight", TABLE)
OPTIONAL = ("qkv.bias", "proj.bias")
# derived buffers some timm versions saved in checkpoints; rebuilt by attnlab, so skipped
DERIVED = ("rel_pos.relative_position_index", "rel_pos.height_lookup", "rel_pos.width_lookup")


def convert(state_dict: Mapping[str, Tensor], *, layout: str = "timm",
            axis: str | None = None, **build_kwargs: Any) -> Attention:
    """An attnlab ``maxvit`` module holding a timm MaxViT attention's weights.

    ``state_dict``: the keys of one ``AttentionCl`` (or NCHW ``Attention2d``: 1x1 conv
    weights): ``qkv.weight``, ``proj.weight``, ``rel_pos.relative_position_bias_table``,
    ``qkv.bias`` and ``proj.bias`` (both or neither). ``axis``: ``"block"`` (a block's
    ``attn_block``) or ``"grid"`` (its ``attn_grid``); required, the weights do not say which.
    Width, heads, partition size and bias come from the shapes (a ``dim``, ``heads``,
    ``head_dim``, ``bias``, ``window`` or ``grid`` given must agree with them); other
    ``build_kwargs`` go to ``attnlab.build`` (e.g. ``backend``, ``dropout``). The module
    takes the weights' dtype.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"maxvit: layout must be one of {LAYOUTS}, got {layout!r}")
    if axis not in ("block", "grid"):
        raise ValueError("maxvit: pass axis='block' (a block's attn_block) or axis='grid' "
                         f"(its attn_grid); the weights do not say which, got axis={axis!r}")
    state = _checked(state_dict)
    qkv, proj = _matrix(state["qkv.weight"]), _matrix(state["proj.weight"])
    dim = qkv.shape[1]
    if qkv.shape[0] != 3 * dim or tuple(proj.shape) != (dim, dim):
        raise ValueError(f"maxvit: qkv.weight {tuple(qkv.shape)} and proj.weight "
                         f"{tuple(proj.shape)} must be (3C, C) and (C, C): attnlab's module "
                         "keeps the width (no dim_out != dim)")
    heads, size, table = _table(state[TABLE], layout)
    if dim % heads:
        raise ValueError(f"maxvit: {heads} heads (from the bias table) do not divide "
                         f"the width {dim}")
    inferred = {"dim": dim, "heads": heads, "head_dim": dim // heads,
                "bias": "qkv.bias" in state, "window" if axis == "block" else "grid": size}
    agree("maxvit", inferred, build_kwargs)
    attn = al.build("maxvit", axis=axis, **inferred, **build_kwargs)
    attn = attn.to(qkv.dtype)
    weights = _split_qkv(qkv, state.get("qkv.bias"), heads, layout)
    weights.update({"o_proj.weight": proj, f"bias.{axis}.table": table})
    if inferred["bias"]:
        weights["o_proj.bias"] = state["proj.bias"]
    return load_exactly("maxvit", attn, weights)


def _checked(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without derived buffers; refuses unknown or missing keys."""
    keys = set(state_dict)
    missing = set(REQUIRED) - keys
    if ("qkv.bias" in keys) != ("proj.bias" in keys):
        missing |= set(OPTIONAL) - keys
    refuse_keys("maxvit", keys - set(REQUIRED) - set(OPTIONAL) - set(DERIVED), missing)
    check_biases("maxvit", state_dict, ("qkv", "proj"))
    return {k: v for k, v in state_dict.items() if k not in DERIVED}


def _matrix(weight: Tensor) -> Tensor:
    """A Linear weight, or a 1x1 Conv2d weight (Attention2d) as one."""
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight[:, :, 0, 0]
    if weight.dim() != 2:
        raise ValueError(f"maxvit: expected a linear or 1x1 conv weight, got shape "
                         f"{tuple(weight.shape)}")
    return weight


def _table(table: Tensor, layout: str) -> tuple[int, int, Tensor]:
    """(heads, partition size P, attnlab's (heads, 2P-1, 2P-1) table) of the official table."""
    if layout == "timm":
        if table.dim() != 2:
            raise ValueError(f"maxvit: a timm-layout table is ((2P-1)^2, heads), got "
                             f"{tuple(table.shape)}")
        span = round(table.shape[0] ** 0.5)
        heads = table.shape[1]
        square = span * span == table.shape[0]
        table = table.T.reshape(heads, span, span) if square else table
    else:
        if table.dim() != 3 or table.shape[1] != table.shape[2]:
            raise ValueError(f"maxvit: a tf-layout table is (heads, 2P-1, 2P-1), got "
                             f"{tuple(table.shape)}")
        heads, span, square = table.shape[0], table.shape[1], True
        table = table.flip(1, 2)
    if not square or span % 2 == 0:
        raise ValueError(f"maxvit: the bias table {tuple(table.shape)} is not that of a "
                         "square P x P partition")
    return heads, (span + 1) // 2, table


def _split_qkv(qkv: Tensor, bias: Tensor | None, heads: int, layout: str
               ) -> dict[str, Tensor]:
    """The fused projection's rows as attnlab's q, k, v weights (and biases)."""
    dim = qkv.shape[1]
    rows = torch.arange(3 * dim, device=qkv.device)
    if layout == "timm":  # per head [q | k | v]
        rows = rows.reshape(heads, 3, dim // heads).transpose(0, 1)
    rows = rows.reshape(3, dim)
    out = {}
    for i, name in enumerate("qkv"):
        out[f"qkv.{name}.weight"] = qkv[rows[i]]
        if bias is not None:
            out[f"qkv.{name}.bias"] = bias[rows[i]]
    return out
