"""Agent, SOFT, L2ViT and RFA: the catalogue's checks (docs/mechanisms/, the linear family)."""

import pytest
import torch

import attnlab as al
from attnlab.mechanisms.soft import gaussian_kernel, newton_inverse


def test_agent_matrix_is_nonnegative_with_unit_rows_on_images_and_sequences():
    torch.manual_seed(0)
    attn = al.build("agent", dim=32, heads=4)
    with torch.no_grad():
        attn.bias_to_keys.normal_()
        attn.bias_to_agents.normal_()
    for x in (torch.randn(2, 14, 14, 32), torch.randn(2, 50, 32)):
        w = attn.weights(x)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_agent_pools_49_agents_from_a_14x14_image_as_7x7_means():
    from attnlab.modules.spatial import masked_pool

    q = torch.randn(1, 1, 196, 4)
    agents = masked_pool(q, None, (14, 14), (7, 7))
    block = q[0, 0].view(14, 14, 4)[:2, :2].reshape(4, 4).mean(0)
    torch.testing.assert_close(agents[0, 0, 0], block)


def test_soft_landmarks_come_from_ratio_cells_or_a_fixed_number():
    attn = al.build("soft", dim=32, heads=2)  # the official third stage: 2 x 2 cells
    assert attn._cells((14, 14)) == (7, 7) and attn._cells((1, 4096)) == (1, 2048)
    fixed = al.build("soft", dim=32, heads=2, landmark="pool", landmarks=49)
    assert fixed._cells((1, 4096)) == (1, 49) and fixed._cells((56, 56)) == (7, 7)
    assert fixed._cells((1, 10)) == (1, 10)  # never more landmarks than tokens
    assert al.build("soft", dim=32, heads=2, ratio=4)._cells((1, 4096)) == (1, 1024)


def test_newton_inverse_is_close_to_pinv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64)
    a = gaussian_kernel(x, x)
    reg = 0.01 * torch.eye(16, dtype=torch.float64)
    newton = newton_inverse(a, iterations=40)
    torch.testing.assert_close(newton, torch.linalg.inv(a + reg), atol=1e-6, rtol=1e-6)
    rel = (newton - torch.linalg.pinv(a)).norm() / torch.linalg.pinv(a).norm()
    assert rel < 0.05  # the 0.01 regulariser is the only gap to the exact pseudo-inverse


def _soft(ratio, inverse="exact"):
    torch.manual_seed(0)
    return al.build("soft", dim=32, heads=2, landmark="pool", ratio=ratio, inverse=inverse,
                    local=False)


def test_soft_with_as_many_landmarks_as_tokens_equals_the_full_kernel_product():
    attn = _soft(ratio=1).double()
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    q = attn.split_heads(attn.qkv.qk(x), 2)
    full = gaussian_kernel(q, q)
    torch.testing.assert_close(attn.weights(x), full, atol=1e-8, rtol=1e-6)


def test_soft_nystrom_error_falls_as_landmarks_grow():
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    errors = []
    for ratio in (16, 8, 4, 2):  # 4, 8, 16, 32 landmarks
        attn = _soft(ratio).double()
        q = attn.split_heads(attn.qkv.qk(x), 2)
        errors.append((attn.weights(x) - gaussian_kernel(q, q)).norm().item())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


def _l2vit_block(**kwargs):
    from attnlab.models.blocks import Block
    return Block(32, 4, "l2vit", kwargs, 4, 0.0)


def test_l2vit_lcm_is_a_residual_branch_of_its_block():
    """The LCM is the block's branch x + LCM(LN(x)) after the attention branch (LGABlock):
    with its last convolution at zero the block equals the one without it (local=False)."""
    torch.manual_seed(0)
    block = _l2vit_block().eval()
    x = torch.randn(2, 6, 6, 32)
    plain = _l2vit_block(local=False).eval()
    assert not hasattr(plain, "after") and hasattr(plain, "before")
    plain.load_state_dict(block.state_dict(), strict=False)
    with torch.no_grad():
        block.after.lcm.conv2.conv.weight.zero_()
        block.after.lcm.conv2.conv.bias.zero_()
    torch.testing.assert_close(block(x), plain(x))
    # the bare module is the linear attention alone: tau * relu(q) S / max(relu(q) . z, 100)
    attn = al.build("l2vit", dim=32, heads=4).eval()
    assert not any("lcm" in n for n, _ in attn.named_parameters())
    w = attn.weights(x)
    assert (w >= 0).all() and (w.sum(-1) <= attn.tau.view(1, 4, 1) * 1.0001).all()


def test_l2vit_batch_statistics_in_training_come_from_real_tokens_only():
    """More padding (the LCM's convolutions give padded positions non-zero values) must not
    move the BatchNorm statistics, so real outputs in train mode stay the same."""
    torch.manual_seed(0)
    block = _l2vit_block().train()
    x = torch.randn(2, 10, 32)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    y = block(x, keep)
    longer = torch.cat([x, torch.randn(2, 6, 32)], 1)
    keep_longer = torch.cat([keep, torch.zeros(2, 6, dtype=torch.bool)], 1)
    y_longer = block(longer, keep_longer)
    torch.testing.assert_close(y_longer[:, :10][keep], y[keep])


def test_l2vit_sequences_depend_on_each_other_in_training_only():
    """What docs/mechanisms/l2vit.md says: BatchNorm's batch statistics in training."""
    torch.manual_seed(0)
    block = _l2vit_block()
    x, other = torch.randn(1, 10, 32), torch.randn(1, 10, 32) * 3
    for training, differs in ((True, True), (False, False)):
        block.train(training)
        alone, together = block(x), block(torch.cat([x, other]))[:1]
        assert (not torch.allclose(alone, together, atol=1e-4)) == differs, training


@pytest.mark.parametrize("power", [1, 2])
def test_rfa_fits_its_target_class_better_than_a_random_feature_mlp(power):
    """Targets (1/N) sum_i <z0, z_i>^p, fitted by ridge regression on frozen random features:
    the RFA layer's (heads x C of them) against as many of an MLP on the flattened input.
    Tokens carry a constant coordinate, x = [z; 1], as in the paper's setting: then
    <v_m, x_i> can be constant and sigma(x0^T W_m x_i) carries the dependence on <z0, z_i>.
    When written: relative test error 0.33 vs 0.99 (p = 1) and 0.44 vs 0.86 (p = 2)."""
    torch.manual_seed(0)
    c, n, heads, train, test = 6, 10, 24, 3000, 1000
    attn = al.build("rfa", dim=c, heads=heads, head_dim=c, identity_mean=1.0)
    z = torch.randn(train + test, n + 1, c - 1)
    x = torch.cat([z, torch.ones(train + test, n + 1, 1)], -1)
    x0, context = x[:, :1], x[:, 1:]
    target = ((z[:, 1:] @ z[:, :1].mT).squeeze(-1) ** power).mean(-1)
    call = al.Call(x0, torch.arange(1), None, None, None, context)
    q, k, _ = attn.qkv(call)
    weights = attn.attention_weights(q, k, call)  # (B, M, 1, N)
    rfa_features = (weights @ context.unsqueeze(1)).flatten(1)  # (B, M * C)
    flat = x.flatten(1)
    proj = torch.randn(flat.shape[1], rfa_features.shape[1]) / flat.shape[1] ** 0.5
    mlp_features = torch.relu(flat @ proj)

    def test_error(features):
        f = torch.cat([features, torch.ones(len(features), 1)], 1).double()
        a, b = f[:train], f[train:]
        coef = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1]).double(),
                                  a.T @ target[:train].double())
        return ((b @ coef - target[train:].double()) ** 2).mean() / target[train:].var()

    rfa_error, mlp_error = test_error(rfa_features), test_error(mlp_features)
    assert rfa_error < 0.6 * mlp_error, (rfa_error, mlp_error)
