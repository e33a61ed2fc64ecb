"""``Rotary.rotate_pair`` (q and k rotated with one computation of cos and sin) equals two
``Rotary`` calls bit for bit, and ``rows_seeing``'s single-query causal shortcut equals the
rule it shortcuts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import attnlab as al
from attnlab.core.masks import rows_seeing
from attnlab.modules.rotary import NoRotation, Rotary


class _GivenFrequencies(Rotary):
    """A subclass that only changes the frequencies (as conversion's PretrainedRotary)."""

    def frequencies(self, device: torch.device | str | None = None) -> Tensor:
        return (torch.arange(1, self._frequency_dim // 2 + 1, dtype=torch.float32) / 7).to(
            torch.get_default_device() if device is None else device)


class _OwnForward(Rotary):
    """A subclass with its own forward: the pair must go through it."""

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return super().forward(x, positions) * 2


ROTARIES = {
    "full": lambda: Rotary(8),
    "partial": lambda: Rotary(8, rotary_dim=3),
    "float32_frequencies": lambda: Rotary(8, 500.0, float32_frequencies=True),
    "given_frequencies": lambda: _GivenFrequencies(8, float32_frequencies=True),
}


@pytest.mark.parametrize("kind", sorted(ROTARIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotate_pair_equals_two_calls_bitwise(kind: str, dtype: torch.dtype,
                                             per_row: bool) -> None:
    torch.manual_seed(0)
    rotary = ROTARIES[kind]().to(dtype)
    q = torch.randn(2, 4, 5, 8, dtype=dtype)
    k = torch.randn(2, 2, 5, 8, dtype=dtype)  # fewer key heads (GQA)
    positions = torch.arange(3, 8)
    if per_row:
        positions = torch.stack([positions, positions + 11])
    rq, rk = rotary.rotate_pair(q, k, positions)
    assert torch.equal(rq, rotary(q, positions))
    assert torch.equal(rk, rotary(k, positions))
    assert not torch.equal(rk[..., :2], k[..., :2])  # it rotates


def test_rotate_pair_mixed_dtypes() -> None:
    torch.manual_seed(0)
    rotary = Rotary(8)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8, dtype=torch.float64)
    positions = torch.arange(3)
    rq, rk = rotary.rotate_pair(q, k, positions)
    assert rq.dtype == torch.float32 and rk.dtype == torch.float64
    assert torch.equal(rq, rotary(q, positions)) and torch.equal(rk, rotary(k, positions))


def test_rotate_pair_keeps_an_overridden_forward_and_hooks() -> None:
    torch.manual_seed(0)
    q, k, positions = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(3)
    own = _OwnForward(8)
    rq, rk = own.rotate_pair(q, k, positions)
    assert torch.equal(rq, own(q, positions)) and torch.equal(rk, own(k, positions))
    rotary, seen = Rotary(8), []
    rotary.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    rotary.rotate_pair(q, k, positions)
    assert len(seen) == 2 and seen[0] is q and seen[1] is k


def test_no_rotation_pair_is_the_identity() -> None:
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    rq, rk = NoRotation().rotate_pair(q, k, torch.arange(3))
    assert rq is q and rk is k


def test_prepare_computes_cos_and_sin_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding step of a rope attention: one cos/sin computation per call, and the same
    output as rotating q and k separately."""
    torch.manual_seed(0)
    attn = al.build("softmax", dim=16, heads=4, kv_heads=2, rope=True, causal=True).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    calls = []
    cos_sin = Rotary._cos_sin

    def counting(self: Rotary, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        calls.append(dtype)
        return cos_sin(self, positions, dtype)

    monkeypatch.setattr(Rotary, "_cos_sin", counting)
    state = attn.new_state(batch_size=2)
    y = torch.cat([attn(x[:, :4], state=state), attn(x[:, 4:5], state=state),
                   attn(x[:, 5:6], state=state)], 1)
    assert len(calls) == 3
    monkeypatch.setattr(Rotary, "rotate_pair", lambda self, q, k, positions:
                        (self(q, positions), self(k, positions)))
    state = attn.new_state(batch_size=2)
    separate = torch.cat([attn(x[:, :4], state=state), attn(x[:, 4:5], state=state),
                          attn(x[:, 5:6], state=state)], 1)
    assert len(calls) == 3 + 6
    assert torch.equal(y, separate)


def _rows_seeing_by_rule(marked: Tensor, lq: int, causal: bool) -> Tensor:
    """Row i sees key j when j <= i + Lk - Lq (causal, aligned to the end) or always."""
    lk = marked.shape[-1]
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    vis = (j <= i + lk - lq) if causal else torch.ones(lq, lk, dtype=torch.bool)
    return (vis & marked.unsqueeze(-2)).any(-1)


@pytest.mark.parametrize("lq", [1, 2, 5])
@pytest.mark.parametrize("lk", [0, 1, 4, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_rows_seeing_matches_the_rule(lq: int, lk: int, causal: bool) -> None:
    gen = torch.Generator().manual_seed(lq * 100 + lk)
    marked = torch.rand(3, 2, lk, generator=gen) < 0.3
    marked[0, 0] = False  # a row with nothing marked
    if lk:
        marked[0, 1] = False
        marked[0, 1, -1] = True  # only the last key marked
        marked[1, 0] = False
        marked[1, 0, 0] = True  # only the first key marked
    got = rows_seeing(marked, lq, causal=causal)
    assert got.shape == (3, 2, lq)
    assert torch.equal(got, _rows_seeing_by_rule(marked, lq, causal))
    if lk:  # with a key padding mask (Lq axis of size 1) that hides the last key
        mask = torch.ones(3, 1, 1, lk, dtype=torch.bool)
        mask[..., -1] = False
        got = rows_seeing(marked, lq, causal=causal, mask=mask)
        assert torch.equal(got, _rows_seeing_by_rule(marked & mask[:, :, 0], lq, causal))
