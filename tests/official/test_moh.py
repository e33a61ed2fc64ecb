"""attnlab.official.moh: MoH state dicts into attnlab modules, checked against
tests/parity/test_moh.py's re-expression of the official module."""

from __future__ import annotations

import pytest
import torch

from attnlab.official import from_official
from attnlab.official.moh import convert
from tests.parity.common import assert_parity
from tests.parity.test_moh import DIM, HEADS, B, N, official_forward, official_params


def state(shared: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() for k, v in official_params(shared, gen).items()}


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, N, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("shared,routed", [(0, 2), (1, 2), (2, 3)])
def test_converted_module_computes_the_official_output(shared, routed):
    sd = state(shared, seed=shared)
    attn = convert(sd, top_k=routed)
    assert (attn.heads, attn.shared_heads, attn.top_k) == (HEADS, shared, routed)
    x = inputs()
    y_off, balance = official_forward(sd, x, shared, routed)
    with torch.no_grad():
        y = attn.train()(x)
        assert_parity({"out": (y, y_off), "extra_loss": (attn.extra_loss(), 0.01 * balance)})
        assert_parity({"out eval": (attn.eval()(x), y_off)})


def test_a_checkpoint_without_qkv_bias_gets_zero_biases():
    sd = {k: v for k, v in state(2, seed=3).items() if k != "qkv.bias"}
    attn = convert(sd, top_k=2)
    x = inputs(4)
    with torch.no_grad():
        zero = dict(sd, **{"qkv.bias": torch.zeros(3 * DIM, dtype=torch.float64)})
        assert_parity({"out": (attn(x), official_forward(zero, x, 2, 2)[0])})
    assert not attn.qkv.q.bias.any()


def test_unexpected_missing_and_contradicting_inputs_are_named():
    sd = state(2)
    with pytest.raises(ValueError, match="pass top_k="):
        convert(sd)
    with pytest.raises(ValueError, match=r"unexpected keys.*'q_norm\.weight'.*LayerNorm"):
        convert(dict(sd, **{"q_norm.weight": torch.ones(4)}), top_k=2)
    with pytest.raises(ValueError, match=r"missing keys.*'wg_0\.weight'"):
        convert({k: v for k, v in sd.items() if k != "wg_0.weight"}, top_k=2)
    with pytest.raises(ValueError, match=r"missing keys.*'wg\.weight'.*no routed head"):
        convert({k: v for k, v in sd.items() if k != "wg.weight"}, top_k=2)
    with pytest.raises(ValueError, match="heads=8 contradicts"):
        convert(sd, top_k=2, heads=8)
    with pytest.raises(ValueError, match="layout"):
        convert(sd, layout="vit", top_k=2)


def test_from_official_takes_one_attention_out_of_a_whole_model_checkpoint():
    sd = state(1, seed=5)
    ckpt = {"blocks.0.adaLN_modulation.1.weight": torch.zeros(6 * DIM, DIM),
            "blocks.0.mlp.fc1.weight": torch.zeros(4 * DIM, DIM),
            "blocks.1.attn.wg.weight": torch.zeros(3, DIM)}
    ckpt.update({f"blocks.0.attn.{k}": v for k, v in sd.items()})
    attn = from_official("moh", ckpt, prefix="blocks.0.attn.", layout="moh", top_k=2)
    x = inputs(6)
    with torch.no_grad():
        assert_parity({"out": (attn(x), official_forward(sd, x, 1, 2)[0])})
