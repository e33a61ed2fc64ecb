"""Selecting, reordering and repeating the sequences of a decoding state (``State.select``,
what beam search needs): for every mechanism that can decode, a state prefilled with three
different (padded) sequences, then reordered or cut to a subset, decodes the next tokens as a
fresh state fed the same rows from the start. This also checks the convention ``select``
relies on: every entry of every mechanism's state holds the batch along dim 0.
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.core.state import State

from ..conformance.test_conformance import _cases, inputs, make
from ..device import DEVICE
from ..tolerances import assert_close

PREFILL, LENGTH = 6, 9
DTYPE = torch.float64


def _padding() -> torch.Tensor:
    """Three rows that differ in their padding too: left padding, a hole, none."""
    keep = torch.ones(3, LENGTH, dtype=torch.bool)
    keep[0, :2] = False
    keep[1, 3] = False
    return keep.to(DEVICE)


def _decode(attn: al.Attention, state: State, x: torch.Tensor, keep: torch.Tensor
            ) -> torch.Tensor:
    """Tokens PREFILL.. of ``x``: one step, then the last two at once."""
    steps = [attn(x[:, PREFILL:PREFILL + 1], mask=keep[:, PREFILL:PREFILL + 1], state=state),
             attn(x[:, PREFILL + 1:], mask=keep[:, PREFILL + 1:], state=state)]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name, kwargs, causal",
                         _cases(need=lambda i: i.decode, only=True, own_variants_slow=True))
def test_a_selected_state_decodes_as_a_fresh_state_of_those_rows(name, kwargs, causal):
    attn = make(name, kwargs, causal=True, dtype=DTYPE)
    x, keep = inputs(b=3, length=LENGTH, dtype=DTYPE), _padding()
    with torch.no_grad():
        for rows in ([2, 0, 0], [1]):
            index = torch.tensor(rows, device=DEVICE)
            state = attn.new_state(batch_size=3)
            attn(x[:, :PREFILL], mask=keep[:, :PREFILL], state=state)
            per_token = state.numbers_per_token()
            state.select(index)
            assert state.batch_size == len(rows) and state.position == PREFILL
            assert state.numbers_per_token() == per_token  # per sequence, as before
            got = _decode(attn, state, x[index], keep[index])

            fresh = attn.new_state(batch_size=len(rows))
            attn(x[index, :PREFILL], mask=keep[index, :PREFILL], state=fresh)
            expected = _decode(attn, fresh, x[index], keep[index])
            real = keep[index, PREFILL:]
            assert_close(got[real], expected[real], msg=f"{name} {kwargs} rows {rows}")


def _state(batch: int = 3) -> State:
    state = State("test", batch)
    state.put(summary=torch.arange(batch * 2.0).reshape(batch, 2))
    state.append("k", torch.arange(batch * 3.0).reshape(batch, 1, 3), dim=2)
    state.append("k", torch.full((batch, 1, 2), -1.0), dim=2)
    return state


def test_select_reorders_every_entry_and_keeps_growing_entries_growing():
    state = _state()
    capacity = state._growing["k"][0].shape[2]
    state.select([2, 0, 0, 1])
    assert state.batch_size == 4
    assert torch.equal(state.get("summary"), torch.tensor([[4.0, 5], [0, 1], [0, 1], [2, 3]]))
    k = state.get("k")
    assert k is not None and k.shape == (4, 1, 5)
    assert torch.equal(k[:, 0, :3], torch.tensor([[6.0, 7, 8], [0, 1, 2], [0, 1, 2], [3, 4, 5]]))
    assert state._growing["k"][0].shape[2] == capacity  # the spare capacity is kept
    state.append("k", torch.zeros(4, 1, 1), dim=2)  # and appends go on
    assert state.get("k").shape == (4, 1, 6)


def test_repeat_interleave_repeats_each_sequence():
    state, expected = _state(), _state()
    state.repeat_interleave(2)
    expected.select(torch.tensor([0, 0, 1, 1, 2, 2]))
    assert state.batch_size == 6
    for name in ("summary", "k"):
        assert torch.equal(state.get(name), expected.get(name))
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        state.repeat_interleave(0)


@pytest.mark.parametrize("index, message", [
    (torch.tensor([[0, 1]]), r"1-D integer index, got torch.int64 of shape \(1, 2\)"),
    (torch.tensor([0.0, 1.0]), "integer index, got torch.float32"),
    (torch.tensor([True, False, True]), "integer index, got torch.bool"),
    (torch.tensor([], dtype=torch.long), "non-empty"),
    (torch.tensor([0, 3]), r"selects row 3 of a state of 3 sequences \(rows 0..2\)"),
    (torch.tensor([-1, 0]), "selects row -1 of a state of 3"),
])
def test_a_bad_index_is_refused_and_changes_nothing(index, message):
    state = _state()
    before = state.get("summary").clone()
    with pytest.raises(ValueError, match=message):
        state.select(index)
    assert state.batch_size == 3 and torch.equal(state.get("summary"), before)


def test_an_entry_without_the_batch_at_dim_0_is_refused_before_anything_changes():
    state = _state()
    state.put(by_head=torch.zeros(4, 3))  # batch along dim 1
    before = state.get("k").clone()
    with pytest.raises(ValueError, match=r"entry 'by_head' of shape \(4, 3\) does not hold "
                                         "the batch of 3 along dim 0"):
        state.select([1, 0, 2])
    assert torch.equal(state.get("k"), before)


@pytest.mark.parametrize("shape, dim", [((1, 2, 1, 5), 2), ((1, 3, 1, 4), 2),
                                         ((1, 2, 3, 4), 1)])
def test_append_refuses_other_sizes_or_dim(shape, dim):
    state = State("softmax", 1)
    state.append("k", torch.zeros(1, 2, 3, 4), dim=2)
    with pytest.raises(ValueError, match=r"state entry 'k' holds \(1, 2, 64, 4\) along dim 2"):
        state.append("k", torch.zeros(shape), dim=dim)
    assert state.append("k", torch.zeros(1, 2, 1, 4), dim=-2).shape == (1, 2, 4, 4)
