"""Gated Attention checkpoints (qiuzh20/gated_attention, Qwen3 layout) into attnlab's ``gated``.

Layout ``"qwen3"`` (keys relative to a layer's ``self_attn``): ``q_proj.weight`` whose rows
are, per key/value head, that group's query rows then its gate rows (one per query head:
headwise; one per query channel: elementwise), ``k_proj.weight``, ``v_proj.weight``,
``o_proj.weight``, their biases (all four or none: Qwen3's ``attention_bias``), and
``q_norm.weight`` / ``k_norm.weight`` (per-head RMSNorm, when the model uses q/k norm).

>>> attn = from_official("gated", layer_state, prefix="model.layers.0.self_attn.",
...                      layout="qwen3", rope_base=config.rope_theta)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import attnlab as al
from attnlab.mechanisms.base import Attention
from attnlab.official._common import agree, check_biases, load_exactly, refuse_keys

LAYOUTS = ("qwen3",)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS = tuple(f"{p}.weight" for p in PROJECTIONS)
BIASES = tuple(f"{p}.bias" for p in PROJECTIONS)
NORMS = ("q_norm.weight", "k_norm.weight")


def convert(state_dict: Mapping[str, Tensor], *, layout: str = "qwen3",
            **build_kwargs: Any) -> Attention:
    """An attnlab ``gated`` module holding an official (Qwen3-layout) gated attention.

    Width, heads, key/value heads, head width, gate kind, bias and q/k norm come from the
    shapes; without ``q_norm`` the head width is not in them: pass ``heads=`` or
    ``head_dim=``. A value given for any of these must agree with the shapes. The module is
    the official configuration: causal, RoPE on (pass the model's ``rope_base=``, its
    ``rope_theta``; attnlab's default is 10000, Hugging Face's Qwen3Config default), q/k
    RMSNorm eps 1e-6; other ``build_kwargs`` go to ``attnlab.build``. The module takes the
    weights' dtype.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"gated: layout must be one of {LAYOUTS}, got {layout!r}")
    _check_keys(state_dict)
    inferred = agree("gated", _infer(state_dict, build_kwargs), build_kwargs)
    build_kwargs.setdefault("causal", True)
    build_kwargs.setdefault("rope", True)
    attn = al.build("gated", **inferred, **build_kwargs)
    attn = attn.to(state_dict["q_proj.weight"].dtype)
    return load_exactly("gated", attn, _weights(state_dict, inferred))


def _check_keys(state_dict: Mapping[str, Tensor]) -> None:
    keys = set(state_dict)
    missing = set(WEIGHTS) - keys
    for group in (BIASES, NORMS):  # all of a group or none
        if keys & set(group):
            missing |= set(group) - keys
    refuse_keys("gated", keys - set(WEIGHTS) - set(BIASES) - set(NORMS), missing)
    check_biases("gated", state_dict, PROJECTIONS)


def _infer(state_dict: Mapping[str, Tensor], given: dict[str, Any]) -> dict[str, Any]:
    """dim, heads, kv_heads, head_dim, gate, bias, qk_norm from the shapes."""
    dim, width = state_dict["o_proj.weight"].shape  # (C, H * D)
    if "q_norm.weight" in state_dict:
        head_dim = state_dict["q_norm.weight"].shape[0]
    elif given.get("head_dim") is not None:
        head_dim = given["head_dim"]
    elif given.get("heads") is not None and width % given["heads"] == 0:
        head_dim = width // given["heads"]
    else:
        raise ValueError("gated: the state dict has no q_norm to give the head width; pass "
                         "heads= (dividing o_proj's input width) or head_dim=")
    kv_width, q_rows = state_dict["k_proj.weight"].shape[0], state_dict["q_proj.weight"].shape[0]
    if width % head_dim or kv_width % head_dim:
        raise ValueError(f"gated: head width {head_dim} does not divide o_proj's input "
                         f"({width}) or k_proj's output ({kv_width})")
    heads, kv_heads = width // head_dim, kv_width // head_dim
    group = heads // kv_heads
    gate_rows = q_rows // kv_heads - group * head_dim
    kinds = {group: "headwise", group * head_dim: "elementwise"}
    if q_rows % kv_heads or gate_rows not in kinds:
        raise ValueError(f"gated: q_proj has {q_rows} rows; a gated Qwen3 layer with "
                         f"{heads} heads, {kv_heads} key/value heads of width {head_dim} has "
                         f"{kv_heads * group * head_dim} query rows plus {heads} (headwise) "
                         f"or {heads * head_dim} (elementwise) gate rows")
    return {"dim": dim, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "gate": kinds[gate_rows], "bias": "q_proj.bias" in state_dict,
            "qk_norm": "q_norm.weight" in state_dict}


def _weights(state_dict: Mapping[str, Tensor], shape: dict[str, Any]) -> dict[str, Tensor]:
    """attnlab parameter name -> tensor: q_proj's rows split into queries and gates."""
    kv, d = shape["kv_heads"], shape["head_dim"]
    per = state_dict["q_proj.weight"].shape[0] // kv
    queries = shape["heads"] // kv * d
    rows = torch.arange(kv * per).reshape(kv, per)
    q_rows, g_rows = rows[:, :queries].reshape(-1), rows[:, queries:].reshape(-1)
    names = {"qkv.k": "k_proj", "qkv.v": "v_proj", "o_proj": "o_proj"}
    out = {}
    for kind in ("weight", "bias"):
        if f"q_proj.{kind}" not in state_dict:
            continue
        out[f"qkv.q.{kind}"] = state_dict[f"q_proj.{kind}"][q_rows]
        out[f"gate.proj.{kind}"] = state_dict[f"q_proj.{kind}"][g_rows]
        out.update({f"{mine}.{kind}": state_dict[f"{theirs}.{kind}"]
                    for mine, theirs in names.items()})
    if shape["qk_norm"]:
        out["qk_norm.q.weight"] = state_dict["q_norm.weight"]
        out["qk_norm.k.weight"] = state_dict["k_norm.weight"]
    return out

