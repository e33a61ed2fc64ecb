"""MoH checkpoints (SkyworkAI/MoH ``MoHAttention`` of MoH-DiT/models.py, the same gating as
MoH-ViT's ``Attention``) into attnlab's ``moh``.

Layout ``"moh"`` (keys relative to the attention module): a fused ``qkv.weight`` (3 H D, C)
with ``qkv.bias`` when built with ``qkv_bias=True``, ``proj.weight`` / ``proj.bias``, the
routed-head router ``wg.weight`` (H - h_s, C), the shared/routed mix ``wg_0.weight`` (2, C,
only with shared heads) and the shared-head router ``wg_1.weight`` (h_s, C, only with two or
more shared heads).

>>> attn = from_official("moh", dit.state_dict(), prefix="blocks.0.attn.", layout="moh",
...                      top_k=6)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

import attnlab as al
from attnlab.mechanisms.base import Attention
from attnlab.official._common import agree, check_biases, hints_for, load_exactly, refuse_keys

LAYOUTS = ("moh",)
REQUIRED = ("qkv.weight", "proj.weight", "wg.weight")
OPTIONAL = ("qkv.bias", "proj.bias", "wg_0.weight", "wg_1.weight")
HINTS = {"q_norm.": "the official qk_norm is a LayerNorm (attnlab's qk_norm is an RMSNorm): "
                    "not converted",
         "k_norm.": "the official qk_norm is a LayerNorm (attnlab's qk_norm is an RMSNorm): "
                    "not converted"}
ROUTERS = {"router.weight": "wg.weight", "mix.weight": "wg_0.weight",
           "shared_router.weight": "wg_1.weight"}


def convert(state_dict: Mapping[str, Tensor], *, layout: str = "moh",
            top_k: int | None = None, **build_kwargs: Any) -> Attention:
    """An attnlab ``moh`` module holding an official MoH attention's weights.

    ``top_k``: the number of routed heads each token activates (the official
    ``routed_head``); required, the weights do not say it. Heads (routed rows of ``wg`` plus
    the shared heads: 0 without ``wg_0``, 1 with ``wg_0`` alone, the rows of ``wg_1``),
    width, head width and bias come from the shapes (a value given must agree). A
    checkpoint without ``qkv.bias`` (the official default ``qkv_bias=False``; ``proj``
    always has one) gets q, k, v biases of 0: the same function, as attnlab's ``bias``
    switches all four projections. Other ``build_kwargs`` go to ``attnlab.build`` (e.g.
    ``balance_weight``). The module takes the weights' dtype.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"moh: layout must be one of {LAYOUTS}, got {layout!r}")
    if top_k is None:
        raise ValueError("moh: pass top_k= (the official routed_head: routed heads per "
                         "token); the weights do not say it")
    _check_keys(state_dict)
    inferred = agree("moh", _infer(state_dict), build_kwargs)
    attn = al.build("moh", top_k=top_k, **inferred, **build_kwargs)
    attn = attn.to(state_dict["qkv.weight"].dtype)
    return load_exactly("moh", attn, _weights(state_dict))


def _check_keys(state_dict: Mapping[str, Tensor]) -> None:
    keys = set(state_dict)
    unexpected = sorted(keys - set(REQUIRED) - set(OPTIONAL))
    missing = sorted(set(REQUIRED) - keys)
    if "qkv.bias" in keys and "proj.bias" not in keys:
        missing.append("proj.bias")
    if "wg_1.weight" in keys and "wg_0.weight" not in keys:
        missing.append("wg_0.weight")
    hints = hints_for(unexpected, HINTS)
    if "wg.weight" in missing:
        hints.append("a layer without wg has no routed head (routed_head=0, all heads "
                     "shared), which attnlab's moh does not build")
    refuse_keys("moh", unexpected, missing, hints)
    check_biases("moh", state_dict, ("qkv", "proj"))


def _infer(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """dim, heads, head_dim, shared_heads, bias from the shapes."""
    if "wg_1.weight" in state_dict:
        shared = state_dict["wg_1.weight"].shape[0]
    else:
        shared = int("wg_0.weight" in state_dict)
    heads = state_dict["wg.weight"].shape[0] + shared
    rows, dim = state_dict["qkv.weight"].shape
    if rows % (3 * heads) or state_dict["proj.weight"].shape != (dim, rows // 3):
        raise ValueError(f"moh: qkv.weight {tuple(state_dict['qkv.weight'].shape)} and "
                         f"proj.weight {tuple(state_dict['proj.weight'].shape)} are not "
                         f"those of {heads} heads (routers) over width {dim}")
    return {"dim": dim, "heads": heads, "head_dim": rows // (3 * heads),
            "shared_heads": shared, "bias": "proj.bias" in state_dict}


def _weights(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """attnlab parameter name -> tensor (absent q, k, v biases: zeros)."""
    weight = state_dict["qkv.weight"]
    bias = state_dict.get("qkv.bias")
    if bias is None and "proj.bias" in state_dict:
        bias = weight.new_zeros(weight.shape[0])
    out = {"o_proj.weight": state_dict["proj.weight"]}
    if "proj.bias" in state_dict:
        out["o_proj.bias"] = state_dict["proj.bias"]
    for i, name in enumerate("qkv"):
        out[f"qkv.{name}.weight"] = weight.chunk(3, 0)[i]
        if bias is not None:
            out[f"qkv.{name}.bias"] = bias.chunk(3, 0)[i]
    out.update({mine: state_dict[theirs] for mine, theirs in ROUTERS.items()
                if theirs in state_dict})
    return out

