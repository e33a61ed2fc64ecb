"""Encoder, ViT and ICLRegressor: shapes, per-layer mechanisms, extra losses, invariances."""

import pytest
import torch

from attnlab.models import Encoder, ICLRegressor, ViT


def test_encoder_per_layer_mechanisms_are_bidirectional_and_images_keep_their_layout():
    enc = Encoder(32, depth=2, heads=2, mechanism=["neighborhood", "softmax"],
                  mechanism_kwargs=[{"kernel_size": 3}, {}])
    assert [b.attn.causal for b in enc.blocks] == [False, False]
    x = torch.randn(2, 5, 6, 32)
    assert enc(x).shape == x.shape
    assert enc(torch.randn(2, 7, 32), mask=torch.ones(2, 7, dtype=torch.bool)).shape == (2, 7, 32)
    with pytest.raises(ValueError, match="2 entries for depth=3"):
        Encoder(32, depth=3, heads=2, mechanism=["softmax", "softmax"])
    # a 2-D window sees the rows above and below: a change 1 row up reaches the position
    local = Encoder(16, depth=1, heads=2, mechanism="neighborhood",
                    mechanism_kwargs={"kernel_size": 3}).eval()
    img = torch.randn(1, 6, 6, 16)
    moved = img.clone()
    moved[0, 2, 3] += torch.randn(16)
    assert not torch.allclose(local(img)[0, 3, 3], local(moved)[0, 3, 3])
    far = img.clone()
    far[0, 0, 0] += torch.randn(16)
    assert torch.allclose(local(img)[0, 3, 3], local(far)[0, 3, 3])


def test_vit_classifies_and_checks_its_input():
    vit = ViT(8, 2, 1, 10, dim=32, depth=1, heads=2, mechanism="softmax")
    assert vit(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="expects images"):
        vit(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="patch grid"):
        vit(torch.randn(3, 1, 12, 12))
    with pytest.raises(ValueError, match="not divisible"):
        ViT(9, 2, 1, 10)


def test_models_add_the_mechanisms_extra_losses():
    vit = ViT(8, 2, 1, 10, dim=32, depth=2, heads=4, mechanism="moh").train()
    vit(torch.randn(4, 1, 8, 8))
    loss = vit.extra_loss()
    assert loss.item() > 0
    parts = sum(b.attn.extra_loss() for b in vit.encoder.blocks)
    assert torch.allclose(loss, parts)


def test_icl_regressor_is_order_invariant_and_ignores_the_query_label():
    torch.manual_seed(0)
    model = ICLRegressor(5, heads=2)
    x, y, xq = torch.randn(4, 12, 5), torch.randn(4, 12), torch.randn(4, 5)
    pred = model(x, y, xq)
    assert pred.shape == (4,)
    perm = torch.randperm(12)
    assert torch.allclose(model(x[:, perm], y[:, perm], xq), pred, atol=1e-5)
    z, mask = model.tokens(x, y, xq)
    assert z.shape == (4, 13, 6) and not mask[:, -1].any() and mask[:, :-1].all()
    assert (z[:, -1, 5:] == 0).all()  # the query's label slot is 0
    # heads have d + 1 dims each; more layers stack residually
    assert model.layers[0].head_dim == 6
    deep = ICLRegressor(3, heads=1, mechanism=["softmax", "linear"], depth=2, targets=2)
    assert deep(torch.randn(2, 4, 3), torch.randn(2, 4, 2), torch.randn(2, 3)).shape == (2, 2)
    with pytest.raises(ValueError, match="expected x"):
        model(torch.randn(4, 12, 4), y, xq)
    with pytest.raises(ValueError, match="expected y"):
        model(x, torch.randn(4, 11), xq)
