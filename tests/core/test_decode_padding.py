"""Decoding with a state whose first calls had no padding, then a call with padding: a state
keeps no key padding mask while no call has had padding (the op runs without a mask, the
fast path of a decoding step), so the first padded call must mark the keys cached before it
as real."""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from ..device import DEVICE
from ..tolerances import assert_close as close

DIM, HEADS = 16, 2


def _decoders() -> list[str]:
    return [n for n in al.available()
            if al.info(n).decode and "seq" in al.info(n).domains and al.info(n).causal]


@pytest.mark.parametrize("name", _decoders())
def test_padding_after_unpadded_calls_equals_the_full_forward(name):
    torch.manual_seed(0)
    attn = al.build(name, DIM, HEADS, causal=True).to(DEVICE)
    x = torch.randn(2, 9, DIM, device=DEVICE)
    keep = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    keep[1, 6] = False  # a padded step of sequence 1, after five unpadded tokens
    full = attn(x, mask=keep)
    state = attn.new_state(batch_size=2)
    parts = [attn(x[:, :5], state=state)]  # no mask: every token real
    parts += [attn(x[:, t:t + 1], state=state) for t in (5,)]
    parts += [attn(x[:, 6:8], mask=keep[:, 6:8], state=state)]  # the first padding
    parts += [attn(x[:, 8:9], state=state)]
    out = torch.cat(parts, 1)
    close(out[keep], full[keep])
