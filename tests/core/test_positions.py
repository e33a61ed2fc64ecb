"""``positions=``: the tokens' absolute positions, shared (L,) or per row (B, L).

A left-padded batch counts each row's positions from its first real token (as Hugging Face
does); with ``mask=`` and those per-row positions every mechanism that can decode gives, on
the real tokens, what each row gives alone and unpadded, and a state continues each row's
positions. Mechanisms whose padded batch differs from the rows alone whatever the positions
(windows, pools, grids or learned sparsity that see the layout) are checked for what per-row
positions mean there: row r of a (B, L) call is the call of row r with its (L,) positions.

Softmax-like scores of RoPE-rotated q and k depend on position differences only, so for them
the left-padded check also holds with positions counted from the batch's first token; the
checks that see each row's positions are the mechanisms whose outputs read absolute
positions (feature maps of rotated q and k: hedgehog, linear, ...; selective's temperature,
``test_positions_are_read``) and the decode checks (a step's position against its keys').
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al
from attnlab.modules.rotary import NoRotation, Rotary

from ..device import DEVICE
from ..tolerances import assert_close as close

DIM, HEADS, LENGTH = 16, 2, 9
PADS = (0, 2, 5)  # left padding of each row


def _rope_names() -> list[str]:
    return [n for n in al.available() if "rope" not in al.info(n).unsupported]


def _accepts(name: str) -> bool:
    return al.info(name).cls.positions_refusal is None


def _build(name: str, causal: bool, **kwargs) -> al.Attention:
    torch.manual_seed(0)
    kwargs.setdefault("rope", True)
    attn = al.build(name, dim=DIM, heads=HEADS, causal=causal, **kwargs)
    attn = attn.to(DEVICE, torch.float64)
    for p in attn.parameters():  # non-trivial gates and norms, so that they matter
        if p.dim() == 1:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return attn.eval()


ROPE = _rope_names()
DECODERS = [n for n in ROPE if al.info(n).decode and _accepts(n)]
OTHERS = [n for n in ROPE if not al.info(n).decode and _accepts(n)]
REFUSING = [n for n in ROPE if not _accepts(n)]
# decoders without RoPE (rcmha's relative distances, rfa): positions change nothing, the
# order in the sequence (Call.index) places their terms
PLAIN_DECODERS = [n for n in al.available() if n not in ROPE and al.info(n).decode]


def _some_slow(names: list[str], default: tuple[str, ...]) -> list:
    """``names`` as parameters, those outside ``default`` marked slow (the default run's
    time)."""
    return [pytest.param(n, marks=[] if n in default else pytest.mark.slow) for n in names]


def left_padded(b: int = len(PADS), length: int = LENGTH, seed: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, L, C) float64, keep (B, L) with PADS[r] pad tokens first, positions (B, L):
    0 .. on each row's real tokens (the pad tokens hold 0, as Hugging Face gives them 1:
    whatever they hold, they are padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, DIM, generator=g, dtype=torch.float64)
    keep = torch.ones(b, length, dtype=torch.bool)
    positions = torch.zeros(b, length, dtype=torch.int64)
    for r, p in enumerate(PADS[:b]):
        keep[r, :p] = False
        positions[r, p:] = torch.arange(length - p)
    return x.to(DEVICE), keep.to(DEVICE), positions.to(DEVICE)


def test_the_sets_of_mechanisms_are_what_the_registry_says():
    assert {"softmax", "hedgehog", "selective", "mala", "neighborhood", "moh"} <= set(DECODERS)
    assert REFUSING == ["longheads"]
    assert "rcmha" in PLAIN_DECODERS


@pytest.mark.parametrize("name", DECODERS)
def test_left_padded_batch_equals_each_row_alone(name):
    attn = _build(name, causal=True)
    x, keep, positions = left_padded()
    y = attn(x, mask=keep, positions=positions)
    for r, p in enumerate(PADS):
        close(y[r, p:], attn(x[r:r + 1, p:])[0], msg=f"{name} row {r} ({p} pad tokens)")


@pytest.mark.parametrize("name", PLAIN_DECODERS)
def test_left_padded_batch_equals_each_row_alone_without_rope(name):
    attn = _build(name, causal=True, rope=False)
    x, keep, positions = left_padded()
    y = attn(x, mask=keep, positions=positions)
    assert torch.equal(y, attn(x, mask=keep))
    for r, p in enumerate(PADS):
        close(y[r, p:], attn(x[r:r + 1, p:])[0], msg=f"{name} row {r} ({p} pad tokens)")


@pytest.mark.parametrize("name", DECODERS)
def test_decode_continues_each_rows_positions(name):
    """Prefill a left-padded batch, then one token at a time: the first step given its
    positions, the next ones continued by the state; each row equals its own full forward."""
    attn = _build(name, causal=True)
    x, keep, positions = left_padded()
    prefill = 6
    state = attn.new_state(len(PADS))
    outs = [attn(x[:, :prefill], mask=keep[:, :prefill], positions=positions[:, :prefill],
                 state=state)]
    outs.append(attn(x[:, prefill:prefill + 1], positions=positions[:, prefill:prefill + 1],
                     state=state))
    for t in range(prefill + 1, LENGTH):
        outs.append(attn(x[:, t:t + 1], state=state))
    y = torch.cat(outs, 1)
    for r, p in enumerate(PADS):
        close(y[r, p:], attn(x[r:r + 1, p:])[0], msg=f"{name} row {r} ({p} pad tokens)")


@pytest.mark.parametrize("name", _some_slow([n for n in DECODERS + OTHERS
                                             if al.info(n).weights],
                                            ("softmax", "selective", "medusa")))
def test_weights_read_the_positions(name):
    """``weights(positions=)`` is the matrix of the forward with those positions: row by row,
    the weights of that row with its (L,) positions."""
    causal = al.info(name).causal
    attn = _build(name, causal=causal)
    x, keep, positions = left_padded()
    w = attn.weights(x, mask=keep, positions=positions)
    for r in range(len(PADS)):
        alone = attn.weights(x[r:r + 1], mask=keep[r:r + 1], positions=positions[r])
        close(w[r:r + 1], alone, msg=f"{name} row {r}")


@pytest.mark.parametrize("name", _some_slow(OTHERS, ("medusa", "soft")))
def test_per_row_positions_are_each_rows_positions(name):
    """Mechanisms without a decoding state: a (B, L) call gives row r what row r's (L,)
    positions give (their padded batch is not the rows alone, positions or not)."""
    causal = al.info(name).causal
    attn = _build(name, causal=causal)
    x, keep, positions = left_padded()
    y = attn(x, mask=keep, positions=positions)
    for r in range(len(PADS)):
        alone = attn(x[r:r + 1], mask=keep[r:r + 1], positions=positions[r])
        close(y[r:r + 1][keep[r:r + 1]], alone[keep[r:r + 1]], msg=f"{name} row {r}")


def test_positions_are_read():
    """Shifted positions change a position-dependent mechanism (selective's temperature) and
    shifting one row changes that row only; the default is positions 0 .. L-1, bitwise."""
    attn = _build("selective", causal=True)
    x, _, _ = left_padded(seed=2)
    y = attn(x)
    assert torch.equal(attn(x, positions=torch.arange(LENGTH, device=DEVICE)), y)
    shifted = torch.arange(LENGTH, device=DEVICE).repeat(3, 1)
    shifted[1] += 7
    y2 = attn(x, positions=shifted)
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[2], y[2])
    assert not torch.allclose(y2[1], y[1])


def test_state_continues_shared_positions_and_default_is_unchanged():
    """(L,) positions with a state: the next call without positions continues from the last
    one + 1; a state never given positions counts from its own position, as before."""
    attn = _build("selective", causal=True)
    x, _, _ = left_padded(b=2, seed=3)
    start = torch.arange(4, 4 + LENGTH, device=DEVICE)
    full = attn(x, positions=start)
    state = attn.new_state(2)
    y = torch.cat([attn(x[:, :5], positions=start[:5], state=state),
                   attn(x[:, 5:7], state=state), attn(x[:, 7:], state=state)], 1)
    close(y, full)
    plain = attn.new_state(2)
    y = torch.cat([attn(x[:, :5], state=plain), attn(x[:, 5:], state=plain)], 1)
    close(y, attn(x))
    assert plain.get("last_positions") is None


def test_rotary_rotates_each_row_by_its_positions():
    rotary = Rotary(8).double()
    q = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    rows = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [0, 0, 0, 1, 2]])
    out = rotary(q, rows)
    assert out.shape == q.shape
    for r in range(3):
        assert torch.equal(out[r], rotary(q[r:r + 1], rows[r])[0])
    assert torch.equal(NoRotation()(q, rows), q)


def test_compiles_with_per_row_positions():
    """The forward with (B, L) positions traces as one graph (no host read, no data-dependent
    branch); the eager backend keeps the test fast."""
    attn = _build("softmax", causal=True, kv_heads=1)
    x, keep, positions = left_padded()
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    close(compiled(x, mask=keep, positions=positions), attn(x, mask=keep, positions=positions))


@pytest.mark.parametrize("positions, match", [
    (torch.arange(LENGTH, dtype=torch.float32), "integer tensor"),
    (torch.ones(LENGTH, dtype=torch.bool), "integer tensor"),
    ([0, 1, 2], "integer tensor"),
    (torch.arange(LENGTH - 1), r"\(L,\) = \(9,\), \(1, L\) or \(B, L\) = \(3, 9\)"),
    (torch.zeros(2, LENGTH, dtype=torch.int64), r"got shape \(2, 9\)"),
    (torch.zeros(3, LENGTH, 1, dtype=torch.int64), r"got shape \(3, 9, 1\)"),
    (torch.arange(LENGTH, device="meta"), "positions are on meta"),
])
def test_bad_positions(positions, match):
    attn = _build("softmax", causal=True)
    x, keep, _ = left_padded()
    with pytest.raises(ValueError, match=f"softmax: .*{match}"):
        attn(x, mask=keep, positions=positions)
    with pytest.raises(ValueError, match=match):
        attn.weights(x, mask=keep, positions=positions)


def test_positions_of_one_row_are_shared_by_the_batch():
    """(1, L), transformers' usual shape for positions shared by the batch, equals (L,)."""
    attn = _build("softmax", causal=True)
    x, keep, _ = left_padded()
    shared = torch.arange(3, 3 + LENGTH)
    got = attn(x, mask=keep, positions=shared[None])
    close(got, attn(x, mask=keep, positions=shared))
    close(got, attn(x, mask=keep, positions=shared[None].expand(x.shape[0], -1)))


def test_positions_refused_with_context_image_or_by_the_mechanism():
    attn = al.build("softmax", dim=DIM, heads=HEADS).double()
    x, _, positions = left_padded()
    with pytest.raises(ValueError, match="cross-attention"):
        attn(x, context=x, positions=positions)
    img = x[:, :8].reshape(3, 2, 4, DIM)
    with pytest.raises(ValueError, match="grid"):
        attn(img, positions=positions[:, :8])
    for name in REFUSING:
        refusing = _build(name, causal=True)
        with pytest.raises(ValueError, match=f"{name} refuses positions=: .*re-indexed"):
            refusing(x, positions=positions)
        with pytest.raises(ValueError, match=f"{name} refuses positions="):
            refusing(x, positions=positions[0])
