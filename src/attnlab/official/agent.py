"""Official Agent Attention checkpoints (LeapLabTHU/Agent-Attention ``AgentAttention``) into
attnlab's ``agent``.

Layouts (keys relative to the attention module):

- ``"swin"`` (default; agent_transformer/models/agent_swin.py): ``qkv.weight`` (3C, C),
  ``qkv.bias``, ``proj.weight``, ``proj.bias``, the depthwise ``dwc.weight`` (C, 1, 3, 3) and
  ``dwc.bias``, and the bias tables ``an_bias``, ``na_bias`` (H, m, 7, 7), ``ah_bias``
  (1, H, m, Wh, 1), ``aw_bias`` (1, H, m, 1, Ww), ``ha_bias`` (1, H, Wh, 1, m), ``wa_bias``
  (1, H, 1, Ww, m).
- ``"pvt"`` (agent_transformer/models/agent_pvt.py): ``q.weight``/``q.bias`` and ``kv.weight``
  (2C, C)/``kv.bias`` instead of ``qkv``; with ``sr_ratio`` r > 1 also ``sr.weight``
  (C, C, r, r), ``sr.bias``, ``norm.weight``, ``norm.bias``, and ``ah_bias``/``aw_bias``
  sized for the window divided by r.
- ``"deit"`` (agent_transformer/models/agent_deit.py): the Swin keys and the class-token
  biases ``ac_bias`` (1, H, m, 1) and ``ca_bias`` (1, H, 1, m); the module is built with
  ``cls_token=True`` (its input: the class token first, then the s x s patches).

The shapes say everything: C from ``proj.weight``, the heads H and agents m from ``an_bias``,
the window (Wh, Ww) from ``ha_bias`` and ``wa_bias``, r from ``sr.weight``, the qkv bias from
its presence (a checkpoint built with ``qkv_bias=False`` gets q, k, v biases of 0: the same
function, as attnlab's ``bias=`` switches all four projections). Other keyword arguments go
to ``attnlab.build`` (e.g. ``dropout``).

>>> attn = convert(block_state_of_the_attention, layout="swin")   # or from_official("agent", ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

import attnlab as al
from attnlab.official._common import agree, hints_for, load_exactly, refuse_keys

LAYOUTS = ("swin", "pvt", "deit")
_TABLES = {"bias_to_keys": "an_bias", "bias_to_agents": "na_bias",
           "keys_row_bias": "ah_bias", "keys_col_bias": "aw_bias",
           "agents_row_bias": "ha_bias", "agents_col_bias": "wa_bias"}
_AXIS = {"ah_bias": 2, "aw_bias": 2, "ha_bias": 2, "wa_bias": 3}  # the axis kept second
_HINTS = {"ac_bias": "class-token biases: Agent-DeiT's module, layout='deit'",
          "ca_bias": "class-token biases: Agent-DeiT's module, layout='deit'",
          "get_v.": "CSWin's module (LePE on v) is not this layout"}
Source = tuple[str, Callable[[Tensor], Tensor]]


def _chunk(i: int, n: int) -> Callable[[Tensor], Tensor]:
    return lambda t: t.chunk(n, 0)[i]


def _same(t: Tensor) -> Tensor:
    return t


def _sources(layout: str, sr: bool) -> tuple[dict[str, Source], tuple[str, ...]]:
    """attnlab parameter -> (official key, official tensor -> attnlab tensor), and the
    optional official keys (the qkv biases)."""
    if layout in ("swin", "deit"):
        out = {f"qkv.{p}.{kind}": (f"qkv.{kind}", _chunk(i, 3)) for i, p in enumerate("qkv")
               for kind in ("weight", "bias")}
        optional: tuple[str, ...]
        optional = ("qkv.bias",)
    else:
        out = {f"qkv.q.{kind}": (f"q.{kind}", _same) for kind in ("weight", "bias")}
        out |= {f"qkv.{p}.{kind}": (f"kv.{kind}", _chunk(i, 2)) for i, p in enumerate("kv")
                for kind in ("weight", "bias")}
        optional = ("q.bias", "kv.bias")
        if sr:
            out |= {f"qkv.{m}.{kind}": (f"{m}.{kind}", _same) for m in ("sr", "norm")
                    for kind in ("weight", "bias")}
    out |= {"o_proj.weight": ("proj.weight", _same), "o_proj.bias": ("proj.bias", _same),
            "dwconv.conv.weight": ("dwc.weight", _same), "dwconv.conv.bias": ("dwc.bias", _same)}
    out |= {mine: (theirs, _table(theirs)) for mine, theirs in _TABLES.items()}
    if layout == "deit":
        out |= {"keys_cls_bias": ("ac_bias", _vector), "agents_cls_bias": ("ca_bias", _vector)}
    return out, optional


def _vector(t: Tensor) -> Tensor:
    """DeiT's (1, H, m, 1) and (1, H, 1, m) class-token biases as (H, m)."""
    return t.reshape(t.shape[1], -1)


def _table(key: str) -> Callable[[Tensor], Tensor]:
    """The official (1, H, ...) separable tables without their axes of 1; others as they are."""
    if key not in _AXIS:
        return _same
    return lambda t: t.reshape(t.shape[1], t.shape[_AXIS[key]], -1)


def _check_keys(state_dict: Mapping[str, Tensor], layout: str) -> None:
    sources, optional = _sources(layout, "sr.weight" in state_dict)
    known = {theirs for theirs, _ in sources.values()}
    unexpected = sorted(set(state_dict) - known)
    missing = sorted(known - set(state_dict) - set(optional))
    present = [k for k in optional if k in state_dict]
    if present and len(present) != len(optional):  # pvt: both q and kv biases, or neither
        missing += sorted(k for k in optional if k not in state_dict)
    refuse_keys(f"agent ({layout!r} layout)", unexpected, missing,
                hints_for(unexpected, _HINTS))


def _infer(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """dim, heads, agents, window and sr_ratio from the shapes."""
    an, ha, wa = state_dict["an_bias"], state_dict["ha_bias"], state_dict["wa_bias"]
    if an.dim() != 4 or ha.dim() != 5 or wa.dim() != 5:
        raise ValueError(f"agent: an_bias {tuple(an.shape)}, ha_bias {tuple(ha.shape)}, "
                         f"wa_bias {tuple(wa.shape)}: expected (H, m, 7, 7), "
                         "(1, H, Wh, 1, m), (1, H, 1, Ww, m)")
    sr = state_dict.get("sr.weight")
    return {"dim": state_dict["proj.weight"].shape[0], "heads": an.shape[0],
            "agents": an.shape[1], "window": (ha.shape[2], wa.shape[3]),
            "sr_ratio": 1 if sr is None else sr.shape[-1]}


def _merge(inferred: dict[str, Any], build_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The inferred arguments; one also given must agree, and the layout's fixed parts
    (bias, local term, tables) are not arguments."""
    agree("agent", inferred, build_kwargs, fixed=(
        "bias", "local", "dwconv", "position_bias", "cls_token", "kv_heads", "head_dim"))
    return inferred | build_kwargs


def convert(state_dict: Mapping[str, Tensor], *, layout: str = "swin",
            **build_kwargs: Any) -> al.Attention:
    """attnlab's ``agent`` module holding the official ``AgentAttention`` weights of
    ``state_dict`` (keys relative to that module), in the official configuration (biases,
    DWC, bias tables, ``sr_ratio``), in the checkpoint's dtype."""
    if layout not in LAYOUTS:
        raise ValueError(f"agent: layout must be one of {LAYOUTS}, got {layout!r}")
    _check_keys(state_dict, layout)
    kwargs = _merge(_infer(state_dict), dict(build_kwargs))
    attn = al.build("agent", bias=True, cls_token=layout == "deit", **kwargs)
    attn = attn.to(dtype=state_dict["proj.weight"].dtype)
    sources, _ = _sources(layout, kwargs["sr_ratio"] > 1)
    own = dict(attn.named_parameters())
    return load_exactly("agent", attn, {mine: _tensor(state_dict, theirs, f, own[mine])
                                        for mine, (theirs, f) in sources.items()
                                        if mine in own})


def _tensor(state_dict: Mapping[str, Tensor], key: str, f: Callable[[Tensor], Tensor],
            like: Tensor) -> Tensor:
    if key not in state_dict:  # an absent qkv bias (qkv_bias=False): zero, same function
        return torch.zeros_like(like)
    try:
        t = f(state_dict[key])
    except RuntimeError as err:
        raise ValueError(f"agent: {key} of shape {tuple(state_dict[key].shape)} does not "
                         f"fit {tuple(like.shape)}") from err
    if t.shape != like.shape:
        raise ValueError(f"agent: {key} of shape {tuple(state_dict[key].shape)} gives "
                         f"{tuple(t.shape)} where {tuple(like.shape)} is needed")
    return t
