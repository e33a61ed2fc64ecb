"""attnlab.official.inline: an official InLineAttention state dict (random, both layouts)
converted into attnlab's ``inline`` computes what the official module computes on it (the
parity test's float64 re-expression), and bad state dicts are refused naming the keys."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.official import from_official
from attnlab.official.inline import convert
from tests.parity.test_inline import official_forward, official_params

DIM, HEADS, SIDE = 24, 3, 4


def _inputs(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, SIDE * SIDE, DIM, generator=gen, dtype=torch.float64)


def _official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    p = official_params(HEADS, torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in p.items()}


def _pvt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights in the PVT module's layout (q and kv instead of qkv)."""
    out = {k: v for k, v in state.items() if not k.startswith("qkv.")}
    for kind in ("weight", "bias"):
        q, kv = state[f"qkv.{kind}"].split([DIM, 2 * DIM], 0)
        out[f"q.{kind}"], out[f"kv.{kind}"] = q, kv
    return out


def _run(attn: al.Attention, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return attn(x, spatial=(SIDE, SIDE))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


@pytest.mark.parametrize("layout", ["swin", "pvt"])
@pytest.mark.parametrize("feature_map, kernel_func", [("identity", "identity"),
                                                      ("leaky_relu", "leakyrelu")])
def test_converted_module_equals_the_official_module(layout, feature_map, kernel_func):
    state = _official_state(1)
    x = _inputs(2)
    with torch.no_grad():
        want = official_forward(state, x, HEADS, kernel_func)
    given = state if layout == "swin" else _pvt(state)
    attn = convert(given, layout=layout, feature_map=feature_map)
    assert (attn.dim, attn.heads, attn.feature_map) == (DIM, HEADS, feature_map)
    assert next(attn.parameters()).dtype == torch.float64
    _close(_run(attn, x), want)


def test_a_checkpoint_without_qkv_bias_gets_zero_biases():
    state = _official_state(3)
    x = _inputs(4)
    state["qkv.bias"] = torch.zeros_like(state["qkv.bias"])
    with torch.no_grad():
        want = official_forward(state, x, HEADS)
    del state["qkv.bias"]
    _close(_run(convert(state), x), want)


def test_unexpected_and_missing_keys_are_named():
    state = _official_state()
    with pytest.raises(ValueError, match=r"unexpected keys \['relative_position_index'\]"):
        convert({**state, "relative_position_index": torch.zeros(3)})
    without = {k: v for k, v in state.items() if k != "residual.2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['residual.2.bias'\]"):
        convert(without)
    with pytest.raises(ValueError, match=r"unexpected keys \['qkv.bias', 'qkv.weight'\]"):
        convert(state, layout="pvt")
    sr = {**_pvt(state), "sr.weight": torch.zeros(DIM, DIM, 2, 2)}
    with pytest.raises(ValueError, match="sr_ratio > 1"):
        convert(sr, layout="pvt")


def test_contradicting_or_parameter_adding_arguments_are_refused():
    state = _official_state()
    with pytest.raises(ValueError, match="heads=4 contradicts"):
        convert(state, heads=4)
    with pytest.raises(ValueError, match="add parameters"):
        convert(state, qk_norm=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        convert(state, layout="cswin")
    assert convert(state, heads=HEADS).heads == HEADS


def test_from_official_takes_the_attention_out_of_a_whole_block():
    state = _official_state(5)
    x = _inputs(6)
    with torch.no_grad():
        want = official_forward(state, x, HEADS)
    prefix = "layers.1.blocks.0.attn."
    block = {prefix + k: v for k, v in state.items()}
    block |= {"layers.1.blocks.0.norm1.weight": torch.ones(DIM),
              "layers.1.blocks.0.mlp.fc1.weight": torch.zeros(4 * DIM, DIM),
              "layers.1.blocks.1.attn.qkv.weight": torch.zeros(3 * DIM, DIM)}
    _close(_run(from_official("inline", block, prefix=prefix), x), want)
