"""attnlab.official.agent: an official AgentAttention state dict (random; Swin, PVT (with and
without sr_ratio) and DeiT layouts) converted into attnlab's ``agent`` computes what the official
module computes on it (the parity test's float64 re-expression), and bad state dicts are
refused naming the keys."""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.official import from_official
from attnlab.official.agent import convert
from tests.parity.test_agent import DIM, official_forward, official_params

HEADS, AGENTS = 3, 4


def _state(window: int, sr: int = 0, qkv_bias: bool = True, seed: int = 0,
           cls: bool = False) -> dict[str, torch.Tensor]:
    """sr = 0: Swin's layout (DeiT's with ``cls``); sr >= 1: PVT's."""
    gen = torch.Generator().manual_seed(seed)
    p = official_params(HEADS, AGENTS, window, sr, qkv_bias, gen, cls=cls)
    return {k: v.detach().clone() for k, v in p.items()}


def _inputs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, DIM, generator=gen, dtype=torch.float64)


def _close(attn: al.Attention, state: dict[str, torch.Tensor], side: int, seed: int) -> None:
    cls = "ac_bias" in state  # DeiT: the class token, then the patches, as a sequence
    x = _inputs(side * side + cls, seed)
    with torch.no_grad():
        want = official_forward(state, x, HEADS)
        got = attn(x) if cls else attn(x, spatial=(side, side))
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


@pytest.mark.parametrize("layout,window,sr", [("swin", 6, 0), ("swin", 7, 0), ("deit", 5, 0),
                                              ("pvt", 6, 1), ("pvt", 8, 2), ("pvt", 8, 4)])
def test_converted_module_equals_the_official_module(layout, window, sr):
    state = _state(window, sr, seed=window + sr, cls=layout == "deit")
    attn = convert(state, layout=layout)
    assert attn.cls_token == (layout == "deit")
    assert (attn.dim, attn.heads, attn.agents) == (DIM, HEADS, AGENTS)
    assert attn.window == (window, window) and attn.sr_ratio == max(sr, 1)
    assert next(attn.parameters()).dtype == torch.float64
    _close(attn, state, window, seed=1)


@pytest.mark.parametrize("layout,sr", [("swin", 0), ("pvt", 2)])
def test_a_checkpoint_without_qkv_bias_gets_zero_biases(layout, sr):
    state = _state(8, sr, qkv_bias=False, seed=3)
    attn = convert(state, layout=layout)
    assert attn.qkv.q.bias.abs().max() == 0
    _close(attn, state, 8, seed=4)


def test_unexpected_and_missing_keys_are_named():
    state = _state(6)
    with pytest.raises(ValueError, match=r"unexpected keys \['relative_position_index'\]"):
        convert({**state, "relative_position_index": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"missing keys \['wa_bias'\]"):
        convert({k: v for k, v in state.items() if k != "wa_bias"})
    deit = {**state, "ac_bias": torch.zeros(1, HEADS, AGENTS, 1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['ac_bias'\].*layout='deit'"):
        convert(deit)
    with pytest.raises(ValueError, match=r"missing keys \['ca_bias'\]"):
        convert(deit, layout="deit")
    with pytest.raises(ValueError, match=r"unexpected keys \['qkv.bias', 'qkv.weight'\]"):
        convert(state, layout="pvt")
    pvt = _state(8, 2)
    with pytest.raises(ValueError, match=r"missing keys \['norm.bias'\]"):
        convert({k: v for k, v in pvt.items() if k != "norm.bias"}, layout="pvt")


def test_contradicting_or_fixed_arguments_are_refused():
    state = _state(6)
    with pytest.raises(ValueError, match="heads=4 contradicts"):
        convert(state, heads=4)
    with pytest.raises(ValueError, match="window=7 contradicts"):
        convert(state, window=7)
    with pytest.raises(ValueError, match="local= is set by the official"):
        convert(state, local=False)
    with pytest.raises(ValueError, match="layout must be one of"):
        convert(state, layout="cswin")
    assert convert(state, heads=HEADS, window=6).heads == HEADS


def test_from_official_takes_the_attention_out_of_a_whole_block():
    state = _state(7, seed=5)
    prefix = "layers.2.blocks.0.attn."
    block = {prefix + k: v for k, v in state.items()}
    block |= {"layers.2.blocks.0.norm1.weight": torch.ones(DIM),
              "layers.2.blocks.0.mlp.fc1.weight": torch.zeros(4 * DIM, DIM),
              "layers.2.blocks.1.attn.qkv.weight": torch.zeros(3 * DIM, DIM)}
    _close(from_official("agent", block, prefix=prefix), state, 7, seed=6)
