"""sparsifiner's tiled path (``ops.sparsifiner``) against the dense reference, and its memory.

The op computes, per tile of query rows, the tile's connectivity, top-k selection, attention
and distillation KL, and recomputes them in its own backward. Here it must equal the dense
(L, L) computation (the mechanism's ``attend_dense`` and the op written out with
``top_keys``), forward and every gradient, and training must never hold an (L, L) tensor.
"""

import math

import pytest
import torch

import attnlab as al
import attnlab.ops.sparsifiner as sparsifiner_op
from attnlab.core.masks import top_keys, visibility
from attnlab.mechanisms.sparsifiner import SparsifinerAttention
from attnlab.ops.common import expand_kv
from attnlab.ops.softmax import softmax_weights
from attnlab.ops.sparsifiner import TILE_SCORES, sparsifiner_attention

from ..ops.cases import MaxNumel, saved_bytes_beyond
from ..tolerances import assert_close

DIM, HEADS = 32, 4


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to the rounding of two summation orders (``tests/tolerances.py``: ROUNDINGS x
    eps x the observable's scale), the distillation KL and the gradients it reaches included:
    its log-softmax runs in float32 at least, so float64 stays float64 in both paths."""
    assert_close(got, want, msg=what)


# ----------------------------------------------------------------------------------- the op
def dense_op(q, k, v, a, c, *, keep, causal, mask):
    """The op written out over the whole (Lq, Lk): C, the top-k mask of ``top_keys``, softmax
    attention over it, and the KL of the mechanism's reference (summed over rows that see a
    key)."""
    h = q.shape[1]
    k, v = expand_kv(k, h), expand_kv(v, h)
    conn = (a @ c.mT) / math.sqrt(a.shape[-1])
    vis = visibility(q.shape[2], k.shape[2], causal=causal, mask=mask, device=q.device)
    vis = (vis if vis is not None else torch.ones((), dtype=torch.bool)).expand(conn.shape)
    out = softmax_weights(q, k, mask=top_keys(conn.detach(), vis, keep)) @ v
    kl = SparsifinerAttention._distillation(q, k, conn, vis)
    seen = vis.any(-1)
    return out, (kl * seen).sum(), seen.sum()


def op_inputs(lq, lk, dtype, *, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, d, r = 2, 4, 2, 8, 3
    q = torch.randn(b, h, lq, d, generator=g)
    k, v = (torch.randn(b, hkv, lk, d, generator=g) for _ in range(2))
    a, c = torch.randn(b, h, lq, r, generator=g), torch.randn(b, h, lk, r, generator=g)
    tensors = [t.to(dtype).requires_grad_() for t in (q, k, v, a, c)]
    mask = None
    if masked:  # random padding, and the first sequence left-padded: early causal rows
        keep = torch.rand(b, lk, generator=g) > 0.25  # see no key at all
        keep[0, : lk // 3] = False
        mask = keep[:, None, None, :]
    return tensors, mask


def check_against_dense(lq, lk, *, causal, masked, rows):
    """Output, KL, rows and the gradients of q, k, v, a and c (from the output and the KL
    together) of the op against ``dense_op``, in float64."""
    (q, k, v, a, c), mask = op_inputs(lq, lk, torch.float64, masked=masked)
    keep = math.ceil(0.3 * lk)
    got = sparsifiner_attention(q, k, v, a, c, keep=keep, causal=causal, mask=mask,
                                distill=True, rows=rows)
    want = dense_op(q, k, v, a, c, keep=keep, causal=causal, mask=mask)
    close(got[0], want[0], "out")
    close(got[1], want[1], "kl")
    assert torch.equal(got[2], want[2]), "rows"
    grad_out = torch.randn(got[0].shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))

    def grads(out, kl):
        return torch.autograd.grad((out * grad_out).sum() + 0.7 * kl, (q, k, v, a, c))

    # q, k and v get the attention's gradient only (the KL's dense attention is detached),
    # a and c the KL's only (the selection is discrete)
    for name, x, y in zip("qkvac", grads(*got[:2]), grads(*want[:2]), strict=True):
        close(x, y, f"grad {name}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,rows,masked", [(37, 37, 5, True), (37, 37, 16, False),
                                              (9, 23, 4, True), (1, 19, 16, True)])
def test_op_tiles_equal_the_dense_computation_in_float64(causal, lq, lk, rows, masked):
    """Several tiles and heads per tile, GQA, odd lengths, rows that see no key, queries
    aligned to the end of the keys."""
    check_against_dense(lq, lk, causal=causal, masked=masked, rows=rows)


@pytest.mark.parametrize("causal", [True, False])
def test_op_tiles_sized_by_memory_equal_the_dense_computation(monkeypatch, causal):
    """The default tiling with a small budget: causal tiles of different heights (taller
    where the rows see fewer keys), several heads per tile."""
    monkeypatch.setattr(sparsifiner_op, "TILE_SCORES", 1 << 15)
    monkeypatch.setattr(sparsifiner_op, "MAX_TILE_ROWS", 64)
    length = 150
    plan = sparsifiner_op._plan(torch.zeros(2, 4, length, 8), length, 3, keep=45,
                                causal=causal, masked=True, scale=None, distill=True,
                                rows=None)
    heights = [i1 - i0 for i0, i1 in sparsifiner_op._row_ranges(length, length, plan)]
    assert plan.heads > 1 and sum(heights) == length
    assert (len(set(heights[:-1])) > 1) == causal  # [64, 32, 27, 27] and [27, .., 27, 15]
    check_against_dense(length, length, causal=causal, masked=True, rows=None)


def test_op_without_distillation_gives_no_gradient_to_the_connectivity():
    """The selection is discrete: without the KL, a and c get no gradient (None, as the
    reference's detached top-k), and the KL and its row count are 0."""
    (q, k, v, a, c), mask = op_inputs(13, 13, torch.float64, masked=True)
    out, kl, rows = sparsifiner_attention(q, k, v, a, c, keep=4, causal=True, mask=mask,
                                          rows=4)
    assert kl.item() == 0 and rows.item() == 0
    assert torch.autograd.grad(out.sum(), (a, c), allow_unused=True) == (None, None)
    ref = dense_op(q, k, v, a, c, keep=4, causal=True, mask=mask)[0]
    close(out, ref, "out")


def test_op_rejects_a_mask_that_is_not_key_padding():
    (q, k, v, a, c), _ = op_inputs(5, 5, torch.float32, masked=False)
    with pytest.raises(ValueError, match="key padding"):
        sparsifiner_attention(q, k, v, a, c, keep=2, mask=torch.ones(2, 1, 5, 5, dtype=bool))


# ------------------------------------------------------------------------------ the module
def module_pair(dtype, causal, rows):
    """The module with the earlier low-rank predictor (tiled, ``rows`` rows per tile) and
    the same weights through ``attend_dense``, in training mode (KL distillation on)."""
    torch.manual_seed(0)
    kw = {"dim": DIM, "heads": HEADS, "keep": 0.3, "rank": 4, "causal": causal, "kv_heads": 2,
          "predictor": "lowrank", "distill_weight": 1.0}
    tiled = al.build("sparsifiner", **kw).to(dtype).train()
    tiled.rows_per_tile = rows
    dense = al.build("sparsifiner", **kw).to(dtype).train()
    dense.load_state_dict(tiled.state_dict())
    dense.attend = dense.attend_dense
    return tiled, dense


def step(module, x, mask, grad_out):
    """Output, extra loss and the gradients of x and every parameter of one training step."""
    out = module(x, mask=mask)
    loss = module.extra_loss()
    grads = torch.autograd.grad((out * grad_out).sum() + loss, [x, *module.parameters()])
    return out, loss, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,rows", [(29, 6), (41, 16)])
def test_module_tiles_equal_attend_dense(dtype, causal, length, rows):
    """A training step (output, distillation loss, input and parameter gradients) with key
    padding (the first sequence left-padded) equals the dense reference, per dtype."""
    tiled, dense = module_pair(dtype, causal, rows)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, length, DIM, generator=g).to(dtype).requires_grad_()
    mask = torch.rand(2, length, generator=g) > 0.2
    mask[0, :5] = False
    grad_out = torch.randn(2, length, DIM, generator=g).to(dtype)
    (out, loss, grads), (ref, ref_loss, ref_grads) = (step(m, x, mask, grad_out)
                                                      for m in (tiled, dense))
    close(out, ref, "out")
    close(loss, ref_loss, "distillation loss")
    names = ["x", *(n for n, _ in tiled.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        close(got, want, f"grad {name}")


@pytest.mark.parametrize("causal", [True, False])
def test_basis_predictor_tiles_equal_attend_dense(causal):
    """The default (official) basis predictor: a training step with key padding through the
    op's tiles (the cls row attended densely) equals ``attend_dense``, the reconstruction
    loss and every gradient included; an input shorter than ``tokens`` uses the first rows
    of the basis."""
    torch.manual_seed(0)
    kw = {"dim": DIM, "heads": HEADS, "keep": 0.3, "causal": causal, "kv_heads": 2,
          "tokens": 40, "reduce_n": 4}
    tiled = al.build("sparsifiner", **kw).double().train()
    tiled.rows_per_tile = 5
    dense = al.build("sparsifiner", **kw).double().train()
    dense.load_state_dict(tiled.state_dict())
    dense.attend = dense.attend_dense
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 33, DIM, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.rand(2, 33, generator=g) > 0.2
    mask[0, :5] = False
    grad_out = torch.randn(2, 33, DIM, generator=g, dtype=torch.float64)
    (out, loss, grads), (ref, ref_loss, ref_grads) = (step(m, x, mask, grad_out)
                                                      for m in (tiled, dense))
    keep = mask[..., None]
    close(out * keep, ref * keep, "out")
    close(loss, ref_loss, "reconstruction loss")
    names = ["x", *(n for n, _ in tiled.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        close(got, want, f"grad {name}")


def test_module_rows_that_see_nothing_are_zero_and_add_no_distillation():
    """Causal, left padding: the padded prefix's rows see no key, their output is 0 (no
    NaN) and the loss averages the KL over the other rows only."""
    tiled, dense = module_pair(torch.float64, True, 4)
    x = torch.randn(1, 17, DIM, dtype=torch.float64)
    mask = torch.ones(1, 17, dtype=torch.bool)
    mask[0, :6] = False
    heads = {}
    tiled.hook_heads.register_forward_hook(lambda m, i, o: heads.__setitem__("h", o))
    tiled(x, mask=mask)
    assert torch.isfinite(heads["h"]).all() and (heads["h"][0, :6] == 0).all()
    dense(x, mask=mask)
    close(tiled.extra_loss(), dense.extra_loss(), "loss")


# ------------------------------------------------------------------------------ the memory
def test_training_step_never_allocates_an_l_by_l_tensor():
    """Forward and backward at L = 512 with tiles of 16 rows: no tensor the step allocates
    is larger than a tile of every head (heads x 16 x L), far below one (L, L) matrix; the
    dense reference's step does allocate (L, L) ones, which shows that the probe sees them."""
    length, rows = 512, 16
    tiled, dense = module_pair(torch.float32, True, rows)
    x = torch.randn(1, length, DIM, requires_grad=True)
    with MaxNumel() as probe:
        out = tiled(x)
        (out.sum() + tiled.extra_loss()).backward()
    assert probe.largest <= HEADS * rows * length < length * length
    with MaxNumel() as probe_dense:
        dense(x)
    assert probe_dense.largest >= length * length


def test_tiles_sized_by_memory_stay_within_their_budget():
    """The default tiles (``TILE_SCORES`` scores, taller where causal rows see few keys):
    at L = 2048 no tensor of a training step is larger than the budget, an eighth of one
    (L, L) matrix."""
    length = 2048
    tiled, _ = module_pair(torch.float32, True, None)
    x = torch.randn(1, length, DIM, requires_grad=True)
    with MaxNumel() as probe:
        out = tiled(x)
        (out.sum() + tiled.extra_loss()).backward()
    assert probe.largest <= TILE_SCORES <= length * length / 8


def test_training_keeps_memory_linear_in_length_for_the_backward():
    """What autograd keeps between forward and backward doubles when L doubles (the op saves
    its (B H, L, .) inputs and output; the tiles are recomputed), and is below a quarter of
    one (L, L) float32 matrix per head already at L = 512."""
    kept = {}
    for length in (256, 512):
        tiled, _ = module_pair(torch.float32, True, 32)
        x = torch.randn(1, length, DIM, requires_grad=True)
        kept[length] = saved_bytes_beyond((x, *tiled.parameters()),
                                          lambda t=tiled, x=x: t(x) + t.extra_loss())
    assert kept[512] <= 2.2 * kept[256]
    assert kept[512] < HEADS * 512 * 512 * 4 / 4
