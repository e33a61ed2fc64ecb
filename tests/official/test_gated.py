"""attnlab.official.gated: Qwen3-layout gated attention state dicts into attnlab modules,
checked against tests/parity/test_gated.py's re-expression of the official module."""

from __future__ import annotations

import pytest
import torch

from attnlab.official import from_official
from attnlab.official.gated import convert
from tests.parity.common import assert_parity
from tests.parity.test_gated import DIM, HD, HEADS, B, N, official_forward, official_params


def state(kind: str, kv_heads: int, bias: bool, norm: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach()
            for k, v in official_params(kind, kv_heads, bias, norm, gen).items()}


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, N, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("kind,kv_heads,bias", [("elementwise", 2, False),
                                                ("headwise", 4, True), ("headwise", 1, False)])
def test_converted_module_computes_the_official_output(kind, kv_heads, bias):
    sd = state(kind, kv_heads, bias, True, seed=kv_heads)
    attn = convert(sd)
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (HEADS, kv_heads, HD)
    x = inputs()
    with torch.no_grad():
        assert_parity({"out": (attn(x), official_forward(sd, x, kind, kv_heads, True))})


def test_without_q_norm_the_head_count_is_asked_for():
    sd = state("elementwise", 2, False, False)
    with pytest.raises(ValueError, match="pass heads="):
        convert(sd)
    x = inputs()
    with torch.no_grad():
        for kwargs in ({"heads": HEADS}, {"head_dim": HD}):
            attn = convert(sd, **kwargs)
            assert_parity({"out": (attn(x), official_forward(sd, x, "elementwise", 2, False))})


def test_unexpected_missing_and_contradicting_inputs_are_named():
    sd = state("headwise", 2, True, True)
    with pytest.raises(ValueError, match=r"unexpected keys.*'rotary_emb\.inv_freq'"):
        convert(dict(sd, **{"rotary_emb.inv_freq": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"missing keys.*'v_proj\.weight'"):
        convert({k: v for k, v in sd.items() if k != "v_proj.weight"})
    with pytest.raises(ValueError, match=r"missing keys.*'k_norm\.weight'"):
        convert({k: v for k, v in sd.items() if k != "k_norm.weight"})
    with pytest.raises(ValueError, match=r"missing keys.*'o_proj\.bias'"):
        convert({k: v for k, v in sd.items() if k != "o_proj.bias"})
    with pytest.raises(ValueError, match="kv_heads=4 contradicts"):
        convert(sd, kv_heads=4)
    with pytest.raises(ValueError, match="gate rows"):
        convert(dict(sd, **{"q_proj.weight": sd["q_proj.weight"][:-1],
                            "q_proj.bias": sd["q_proj.bias"][:-1]}))
    with pytest.raises(ValueError, match="layout"):
        convert(sd, layout="llama")


def test_from_official_takes_the_attention_out_of_a_whole_layer_checkpoint():
    sd = state("elementwise", 2, False, True, seed=5)
    ckpt = {"model.layers.0.input_layernorm.weight": torch.ones(DIM),
            "model.layers.0.mlp.gate_proj.weight": torch.zeros(4 * DIM, DIM),
            "model.layers.1.self_attn.q_proj.weight": torch.zeros(3, 3)}
    ckpt.update({f"model.layers.0.self_attn.{k}": v for k, v in sd.items()})
    attn = from_official("gated", ckpt, prefix="model.layers.0.self_attn.", layout="qwen3")
    x = inputs(2)
    with torch.no_grad():
        assert_parity({"out": (attn(x), official_forward(sd, x, "elementwise", 2, True))})
