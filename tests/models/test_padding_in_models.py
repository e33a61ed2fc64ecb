"""Models keep the contract's padding promise too (issue 41, found by a new-user trial): a
padded token may hold anything, and neither the real outputs nor any parameter gradient of
a loss over them depends on it — the blocks' norms and MLPs run on padded rows as well, so
a NaN there made every weight gradient NaN (0 x NaN), although the attention zeroes it."""

from __future__ import annotations

import pytest
import torch

from attnlab.models.blocks import Block
from attnlab.models.encoder import Encoder


def _grads(model, x, keep):
    model.zero_grad()
    y = model(x, mask=keep)
    y[keep].sum().backward()
    return y, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [lambda: Encoder(32, depth=2, heads=4),
                                  lambda: Block(32, 4, "l2vit", {}, 2, 0.0)],
                         ids=["encoder-softmax", "block-l2vit"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_padding_reaches_no_output_and_no_gradient(make, fill):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 10, 32)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 7:] = False
    y, grads = _grads(model, x, keep)
    y2, grads2 = _grads(model, x.masked_fill(~keep[..., None], fill), keep)
    torch.testing.assert_close(y2[keep], y[keep], rtol=0, atol=0)
    assert grads.keys() == grads2.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name], g, rtol=0, atol=0, msg=name)


def test_an_image_encoder_takes_an_image_mask_for_a_sequence_mechanism():
    enc = Encoder(32, depth=1, heads=4, mechanism="hedgehog")
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2] = False
    y = enc(torch.randn(2, 3, 4, 32), mask=mask)
    assert y.shape == (2, 3, 4, 32) and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"d": True}, "d must be an int >= 1, got True"),
    ({"d": 2.5}, "d must be an int >= 1, got 2.5"),
    ({"d": 3, "mechanism_kwargs": {"causal": True}}, "causal is not a mechanism argument"),
    ({"d": 3, "mechanism": "neighborhood"}, "neighborhood does not support"),
])
def test_icl_regressor_refuses_what_it_cannot_build_naming_itself(kwargs, match):
    from attnlab.models import ICLRegressor

    with pytest.raises(ValueError, match=match):
        ICLRegressor(**kwargs)
