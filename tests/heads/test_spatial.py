"""Attention against spatial distance, offset patterns and head clusters, on planted heads
whose answers are worked out pair by pair here."""

import pytest
import torch

from attnlab.heads.capture import HeadStats
from attnlab.heads.spatial import cluster_heads, grid_positions, offset_patterns

GRID = (4, 5)  # not square, so rows and columns cannot be swapped unnoticed
CELLS = [(r, c) for r in range(GRID[0]) for c in range(GRID[1])]


def ring(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def planted_maps() -> torch.Tensor:
    """(4, L, L): looks at itself; uniform; uniform over its 8 neighbours; at the patch to
    its right (itself on the last column)."""
    n = len(CELLS)
    maps = torch.zeros(4, n, n)
    for q, a in enumerate(CELLS):
        maps[0, q, q] = 1
        maps[1, q] = 1 / n
        near = [k for k, b in enumerate(CELLS) if ring(a, b) == 1]
        maps[2, q, near] = 1 / len(near)
        right = CELLS.index((a[0], a[1] + 1)) if a[1] + 1 < GRID[1] else q
        maps[3, q, right] = 1
    return maps


def test_grid_positions_follow_the_row_major_token_order():
    assert grid_positions(GRID).tolist() == [list(c) for c in CELLS]


def test_distance_profile_of_planted_heads_matches_the_pairs_counted_by_hand():
    maps = planted_maps()
    stats = HeadStats(4)
    n = len(CELLS)
    vis = torch.ones(2, 1, n, n, dtype=torch.bool)
    stats.update(maps.expand(2, -1, -1, -1), vis, None, grid_positions(GRID))
    rings = max(GRID)
    pairs = [[(q, k) for q in range(n) for k in range(n) if ring(CELLS[q], CELLS[k]) == d]
             for d in range(rings)]
    pair = torch.tensor([[sum(float(maps[h, q, k]) for q, k in pairs[d]) / len(pairs[d])
                          for d in range(rings)] for h in range(4)])
    torch.testing.assert_close(stats.distance_profile("pair"), pair)
    share = torch.tensor([[sum(float(maps[h, q, k]) for q, k in pairs[d]) / n
                           for d in range(rings)] for h in range(4)])
    torch.testing.assert_close(stats.distance_profile("query"), share)
    assert stats.distance_profile("pair")[1].allclose(torch.full((rings,), 1 / n))
    torch.testing.assert_close(stats.distance_profile("query")[2],
                               torch.tensor([0.0, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="per must be"):
        stats.distance_profile("key")


def test_offset_patterns_of_planted_heads():
    maps = planted_maps()
    n = len(CELLS)
    pair = offset_patterns(maps, grid_positions(GRID))
    assert pair.shape == (4, 9, 9)  # offsets -4..4 on both axes (the longer side)
    centre = 4
    assert pair[0, centre, centre] == 1 and pair[0].sum() == 1  # only offset (0, 0)
    seen = torch.zeros(9, 9, dtype=torch.bool)  # offsets some pair has
    for a in CELLS:
        for b in CELLS:
            seen[b[0] - a[0] + centre, b[1] - a[1] + centre] = True
    torch.testing.assert_close(pair[1], torch.where(seen, 1 / n, 0.0))  # uniform: flat
    # the right-neighbour head: every pair at (0, +1) has weight 1; the 4 queries of the
    # last column put 1 on themselves, out of the 20 pairs at (0, 0)
    assert pair[3, centre, centre + 1] == 1
    torch.testing.assert_close(pair[3, centre, centre], torch.tensor(4 / 20))
    assert pair[3].sum() == pytest.approx(1 + 4 / 20)
    share = offset_patterns(maps, grid_positions(GRID), per="query")
    torch.testing.assert_close(share.sum((1, 2)), torch.ones(4))
    torch.testing.assert_close(share[3, centre, centre + 1], torch.tensor(16 / 20))
    cropped = offset_patterns(maps, grid_positions(GRID), reach=1)
    torch.testing.assert_close(cropped, pair[:, 3:6, 3:6])
    with pytest.raises(ValueError, match="integer positions"):
        offset_patterns(maps, grid_positions(GRID) + 0.5)


def test_offset_patterns_of_a_causal_previous_token_head():
    length = 7
    maps = torch.zeros(1, length, length)
    maps[0, 0, 0] = 1
    for q in range(1, length):
        maps[0, q, q - 1] = 1
    pattern = offset_patterns(maps)[0]  # offsets -6..6, 0 at index 6
    assert pattern[5] == 1 and pattern[6] == pytest.approx(1 / length)
    assert pattern[7:].sum() == 0


def noisy(pattern: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (pattern + 0.02 * torch.rand(pattern.shape, generator=g)) / (1 + 0.02)


def test_clustering_recovers_planted_families_of_heads():
    base = offset_patterns(planted_maps(), grid_positions(GRID))
    # layer 0: self, right, uniform, right; layer 1: uniform, self, right, self
    families = {0: [0, 3, 1, 3], 1: [1, 0, 3, 0]}
    patterns = {layer: torch.stack([noisy(base[f], 10 * layer + h)
                                    for h, f in enumerate(kinds)])
                for layer, kinds in families.items()}
    found = cluster_heads(patterns)
    assert found.k == 3 and max(found.silhouette, key=found.silhouette.get) == 3
    planted = [families[layer][h] for layer, h in found.heads]
    groups = {frozenset(i for i, x in enumerate(found.labels) if x == c) for c in range(3)}
    assert groups == {frozenset(i for i, f in enumerate(planted) if f == kind)
                      for kind in (0, 1, 3)}
    assert found.labels[:2] == [0, 1]  # numbered by first appearance
    assert found.members(0) == [(0, 0), (1, 1), (1, 3)]  # the three self heads
    torch.testing.assert_close(found.centroids[0], torch.stack(
        [patterns[0][0], patterns[1][1], patterns[1][3]]).mean(0))
    assert cluster_heads(patterns, k=2).k == 2
    with pytest.raises(ValueError, match="k must be between 1"):
        cluster_heads(patterns, k=9)
    assert cluster_heads({0: base[:2]}).k == 1  # too few heads to choose k
    with pytest.raises(ValueError, match="at least 2 heads"):
        cluster_heads({0: base[:1]})


def test_a_vit_with_uniform_attention_has_flat_strength_over_patch_distances():
    from attnlab.heads import capture
    from attnlab.models.encoder import ViT

    torch.manual_seed(0)
    model = ViT((8, 10), 2, 1, 10, dim=16, depth=2, heads=2).eval()
    for block in model.encoder.blocks:
        block.attn.qkv.q.weight.data.zero_()  # every key gets 1 / L
    positions = grid_positions(model.grid)
    with torch.no_grad(), capture(model, aggregate=True, positions=positions) as cap:
        model(torch.rand(3, 1, 8, 10))
    cells = [tuple(p) for p in positions.tolist()]
    n = len(cells)
    euclid = sum(((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5
                 for a in cells for b in cells) / n / n
    for layer in (0, 1):
        stats = cap.stats[layer]
        torch.testing.assert_close(stats.distance_profile("pair"), torch.full((2, 5), 1 / n))
        torch.testing.assert_close(stats.mean("distance"), torch.full((2,), euclid))


def test_the_uniform_baseline_counts_the_pairs_a_query_sees():
    maps = planted_maps()
    n = len(CELLS)
    grid = HeadStats(4)
    grid.update(maps[None], torch.ones(1, 1, n, n, dtype=torch.bool), None,
                grid_positions(GRID))
    near = sum(ring(a, b) <= 1 for a in CELLS for b in CELLS) / n ** 2
    assert float(grid.uniform_profile("query")[:2].sum()) == pytest.approx(near)
    # the planted uniform head (head 1) is its own baseline
    torch.testing.assert_close(grid.uniform_profile("pair"), grid.distance_profile("pair")[1])
    assert grid.uniform_mean_distance() == pytest.approx(float(grid.mean("distance")[1]))
    # causal with padding: sequence 0 has 5 real tokens (query i sees 0..i: mean gap i / 2),
    # sequence 1 has 3; the baseline follows what each query could see
    line = HeadStats(1)
    real = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    vis = real[:, None, :, None] & real[:, None, None, :] & torch.ones(5, 5).tril().bool()
    line.update(vis.float() / vis.sum(-1, keepdim=True).clamp_min(1), vis, None, None)
    gaps = [i / 2 for i in range(5)] + [i / 2 for i in range(3)]
    assert line.uniform_mean_distance() == pytest.approx(sum(gaps) / len(gaps))
    torch.testing.assert_close(line.uniform_profile("pair"), line.distance_profile("pair")[0])
