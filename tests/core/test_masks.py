"""top_keys (and the ranks behind it) against the definition, row by row."""

import pytest
import torch

from attnlab.core.masks import NO_KEY, ranked_keys, top_keys


def by_definition(priority, visible, window):
    """Per row: sort the visible keys by (priority, index), largest first; keep ``window``."""
    keep = torch.zeros(visible.shape, dtype=torch.bool)
    for row in range(visible.shape[0]):
        keys = [j for j in range(visible.shape[1]) if visible[row, j]]
        keys.sort(key=lambda j: (float(priority[row, j]), j), reverse=True)
        keep[row, keys[:window]] = True
    return keep


@pytest.mark.parametrize("kind", ["normal", "ties", "negative-ties", "signed-zeros", "huge"])
def test_top_keys_follow_the_priority_with_ties_to_the_later_key(kind):
    g = torch.Generator().manual_seed(0)
    rows, lk = 12, 23
    if kind == "normal":
        p = torch.randn(rows, lk, generator=g)
    elif kind == "ties":
        p = torch.randint(0, 3, (rows, lk), generator=g).float()
    elif kind == "negative-ties":
        p = -torch.randint(0, 4, (rows, lk), generator=g).float() * 0.37
    elif kind == "signed-zeros":  # -0.0 and 0.0 are equal: a tie
        p = torch.where(torch.rand(rows, lk, generator=g) < 0.5, -0.0, 0.0)
    else:
        p = torch.randn(rows, lk, generator=g) * 1e30
        p[:, 3] = float("-inf")
        p[:, 5] = float("inf")
    visible = torch.rand(rows, lk, generator=g) < 0.7
    for window in (1, 4, 15, 30):
        assert torch.equal(top_keys(p, visible, window), by_definition(p, visible, window)), \
            f"window {window}"


def test_ranks_are_distinct_and_hidden_keys_rank_lowest():
    p = torch.tensor([[0.5, 0.5, -2.0, float("-inf"), 3.0]])
    visible = torch.tensor([[True, True, True, True, False]])
    r = ranked_keys(p, visible)
    assert r[0, 4] == NO_KEY and (r[0, :4] > NO_KEY).all()
    assert r[0, 1] > r[0, 0] > r[0, 2] > r[0, 3]  # tie -> later key higher
