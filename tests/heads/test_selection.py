"""Head selection for interventions: divergence (VHD), attention to a segment, top and random
heads, and reinforcement by scaling, on planted heads whose answers are worked out here."""

import pytest
import torch

import attnlab as al
from attnlab.heads.ablate import scale_heads
from attnlab.heads.selection import head_divergence, random_heads, segment_attention, top_heads
from attnlab.models import TransformerLM

DIM, HEADS = 8, 2


def uniform_layer(causal: bool = False) -> torch.nn.Module:
    """q = 0: every head attends uniformly to the keys it sees; v = the input (head h reads
    channels 4h..4h+3); no output projection mixing."""
    layer = al.build("softmax", dim=DIM, heads=HEADS, causal=causal)
    with torch.no_grad():
        layer.qkv.q.weight.zero_()
        layer.qkv.v.weight.copy_(torch.eye(DIM))
        layer.o_proj.weight.copy_(torch.eye(DIM))
    return layer.eval()


def test_divergence_is_the_change_of_the_uniform_mean_at_shared_positions():
    torch.manual_seed(0)
    prefix, segment = torch.randn(1, 5, DIM), torch.randn(1, 3, DIM)
    x = torch.cat([prefix, segment], 1)
    layer = uniform_layer()
    keep = torch.arange(5)
    vhd = head_divergence(layer, lambda: layer(x), lambda: layer(prefix), keep, keep)
    assert vhd.shape == (1, HEADS)
    for h in range(HEADS):
        block = slice(4 * h, 4 * h + 4)
        expected = (x[0, :, block].mean(0) - prefix[0, :, block].mean(0)).norm()
        assert float(vhd[0, h]) == pytest.approx(float(expected), rel=1e-5)
    # a causal layer cannot see a segment that comes after the kept positions
    causal = uniform_layer(causal=True)
    assert head_divergence(causal, lambda: causal(x), lambda: causal(prefix), keep,
                           keep).abs().max() < 1e-6
    # positions are matched as given: the segment put first shifts the prefix's positions
    moved = torch.cat([segment, prefix], 1)
    shifted = head_divergence(causal, lambda: causal(moved), lambda: causal(prefix),
                              torch.arange(3, 8), keep)
    assert shifted.min() > 0.01
    with pytest.raises(ValueError, match="same, non-zero number"):
        head_divergence(layer, lambda: layer(x), lambda: layer(prefix), keep, keep[:2])


def test_segment_attention_counts_the_mass_on_the_segment_keys():
    layer = uniform_layer(causal=True)
    x = torch.randn(2, 6, DIM)
    segment = torch.zeros(2, 6, dtype=torch.bool)
    segment[:, [1, 2]] = True
    queries = torch.zeros(2, 6, dtype=torch.bool)
    queries[:, [3, 5]] = True  # uniform causal rows: 2/4 and 2/6 of the mass on keys 1, 2
    mass = segment_attention(layer, lambda: layer(x), segment, queries)
    torch.testing.assert_close(mass, torch.full((1, HEADS), (2 / 4 + 2 / 6) / 2))
    everyone = segment_attention(layer, lambda: layer(x), segment[0])
    expected = sum(min(max(i, 0), 2) / (i + 1) for i in range(6)) / 6  # row i sees 0..i
    torch.testing.assert_close(everyone, torch.full((1, HEADS), expected))


def test_top_and_random_heads():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.5]])
    assert top_heads(scores, 3) == [(0, 1), (1, 0), (1, 2)]
    with pytest.raises(ValueError, match="between 1 and 6"):
        top_heads(scores, 7)
    model = TransformerLM(vocab=11, dim=16, depth=3, heads=4)
    drawn = random_heads(model, 5, torch.Generator().manual_seed(0))
    assert len(set(drawn)) == 5 and all(0 <= layer < 3 and 0 <= h < 4 for layer, h in drawn)
    again = random_heads(model, 5, torch.Generator().manual_seed(0))
    assert drawn == again
    counts = torch.zeros(3, 4)
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        for layer, h in random_heads(model, 2, g):
            counts[layer, h] += 1
    assert counts.min() > 60 and counts.max() < 140  # each head drawn ~ 100 times


def test_scaling_a_head_scales_its_part_of_the_output():
    layer = uniform_layer()
    x = torch.randn(1, 4, DIM)
    plain = layer(x)
    with scale_heads(layer, [(0, 1)], 3.0):
        reinforced = layer(x)
    torch.testing.assert_close(reinforced[..., 4:], 3 * plain[..., 4:])
    torch.testing.assert_close(reinforced[..., :4], plain[..., :4])
    torch.testing.assert_close(layer.head_scale, torch.ones(HEADS))  # restored
