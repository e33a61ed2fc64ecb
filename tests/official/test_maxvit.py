"""attnlab.official.maxvit: timm / TF MaxViT attention state dicts into attnlab modules,
checked against tests/parity/test_maxvit.py's re-expression of timm's module."""

from __future__ import annotations

import pytest
import torch

from attnlab.official import from_official
from attnlab.official.maxvit import convert
from tests.parity.common import assert_parity
from tests.parity.test_maxvit import official_forward, official_params


def state(layout: str, heads: int = 2, size: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() for k, v in official_params(layout, heads, 4, size, gen).items()}


@pytest.mark.parametrize("layout", ["timm", "tf"])
@pytest.mark.parametrize("axis", ["block", "grid"])
def test_converted_module_computes_the_official_output(layout, axis):
    sd = state(layout, heads=3, size=3, seed=1)
    attn = convert(sd, layout=layout, axis=axis)
    assert attn.heads == 3 and attn.dim == 12 and attn.axis == axis
    x = torch.randn(2, 6, 9, 12, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    with torch.no_grad():
        assert_parity({"out": (attn(x), official_forward(sd, x, axis, 3, layout, 3))})


def test_nchw_conv_weights_and_saved_index_buffers_are_accepted():
    sd = state("timm", seed=3)
    nchw = dict(sd, **{"qkv.weight": sd["qkv.weight"][:, :, None, None],
                       "proj.weight": sd["proj.weight"][:, :, None, None],
                       "rel_pos.relative_position_index": torch.zeros(81, dtype=torch.long)})
    x = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_parity({"out": (convert(nchw, axis="block")(x),
                               official_forward(sd, x, "block", 3, "timm", 2))})


def test_unexpected_missing_and_contradicting_inputs_are_named():
    sd = state("tf")
    with pytest.raises(ValueError, match=r"unexpected keys.*'rel_pos\.extra'"):
        convert(dict(sd, **{"rel_pos.extra": torch.zeros(1)}), layout="tf", axis="grid")
    without = {k: v for k, v in sd.items() if k != "proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys.*'proj\.weight'"):
        convert(without, layout="tf", axis="grid")
    half = {k: v for k, v in sd.items() if k != "proj.bias"}
    with pytest.raises(ValueError, match=r"missing keys.*'proj\.bias'"):
        convert(half, layout="tf", axis="grid")
    with pytest.raises(ValueError, match="axis='block'"):
        convert(sd, layout="tf")
    with pytest.raises(ValueError, match="heads=4 contradicts"):
        convert(sd, layout="tf", axis="grid", heads=4)
    with pytest.raises(ValueError, match="layout"):
        convert(sd, layout="keras", axis="grid")
    with pytest.raises(ValueError, match=r"add parameters.*qk_norm"):
        convert(sd, layout="tf", axis="grid", qk_norm=True)
    with pytest.raises(ValueError, match="tf-layout table"):
        convert(state("timm"), layout="tf", axis="grid")


def test_from_official_takes_one_attention_out_of_a_whole_block_checkpoint():
    block, grid = state("tf", seed=4), state("tf", seed=5)
    ckpt = {"stages.0.blocks.0.conv.conv1_1x1.weight": torch.zeros(8, 8, 1, 1),
            "stages.0.blocks.0.attn_block.norm1.weight": torch.ones(8),
            "stages.0.blocks.0.attn_grid.mlp.fc1.weight": torch.zeros(32, 8)}
    ckpt.update({f"stages.0.blocks.0.attn_block.attn.{k}": v for k, v in block.items()})
    ckpt.update({f"stages.0.blocks.0.attn_grid.attn.{k}": v for k, v in grid.items()})
    attn = from_official("maxvit", ckpt, prefix="stages.0.blocks.0.attn_grid.attn.",
                         layout="tf", axis="grid")
    x = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_parity({"out": (attn(x), official_forward(grid, x, "grid", 3, "tf", 2))})
