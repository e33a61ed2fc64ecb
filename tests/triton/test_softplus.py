"""The softplus attention Triton kernels (LSSA, LSSAR) against the op's reference, forward and
input gradients, under Triton's interpreter on a machine without CUDA (conftest), on CUDA
tensors where there is a GPU.

Tolerance. The exact result is the reference computed in float64. LSSAR's r = N a - 1
cancels, its power p multiplies relative errors by p, and its relu has a kink at r = 0 (with
p = 1 the gradient jumps there), so float32 itself can be far from float64 on a given input:
the reference computed in the kernel's dtype is (LSSAR's dq at p = 15 erred 2e-5 of its
largest value, 150 ulps, on the slow test's inputs; at p = 1 a row 4e-6 from the kink erred
3e-2). The kernel is held, in each row of each result, to twice that reference's largest
distance from float64 in the same row (the kernel rounds as often, in another order) plus a
few ulps of the dtype (float32: 32, the sums of a few dozen terms in another order; float16:
4, P and dS rounded to float16 before their products as the reference rounds its weights).
"""

from __future__ import annotations

import os

import pytest
import torch

from attnlab.ops.dispatch import explain
from attnlab.ops.softplus import BACKENDS, length_scale, softplus_attention
from attnlab.ops.triton.softplus import softplus_attention_triton, triton_limits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# on a GPU, float32 tl.dot defaults to tf32: compare in full float32 (read at compile time)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def ulps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps * (32 if dtype == torch.float32 else 4)


def inputs(b, h, hkv, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    grad_out = torch.randn(b, h, lq, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [grad_out.to(DEVICE)]


def key_padding(b, lk, seed=1):
    """(B, 1, 1, Lk); batch 0's first half is padding (causal: its first rows see no key)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, lk, generator=g) > 0.25
    keep[0, : lk // 2] = False
    return keep[:, None, None, :].to(DEVICE)


def run(q, k, v, grad_out, *, backend, causal, mask=None, reweight_p=None, log_d=None):
    """Output and gradients of q, k, v for sum(out * grad_out)."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    log_d = length_scale(q, None) if log_d is None else log_d
    # backend="triton" through the op (its dispatch, limits and GQA path), as users call it
    out = softplus_attention(*leaves, causal=causal, mask=mask, scale=log_d,
                             reweight_p=reweight_p, backend=backend)
    grads = torch.autograd.grad((out.double() * grad_out.double()).sum(), leaves)
    return (out, *grads)


def check(q, k, v, grad_out, **kw):
    """The kernel against the float64 reference, within twice the distance of the reference
    computed in q's dtype from it (per row) plus ``ulps`` (module docstring); returns the
    kernel's results."""
    dtype = q.dtype
    got = run(q, k, v, grad_out, backend="triton", **kw)
    same = run(q, k, v, grad_out, backend="reference", **kw)
    exact = run(*(t.double() for t in (q, k, v)), grad_out, backend="reference", **kw)
    tol = ulps(dtype)
    assert got[0].dtype == dtype and got[0].shape == exact[0].shape
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), got, same, exact, strict=True):
        assert torch.isfinite(a).all(), name
        assert a.abs().sum() > 0, f"{name} is all 0"
        scale = max(1.0, r.abs().max().item())
        # the reference's error in the same output row (over the last dim), twice
        bound = tol * (scale + r.abs()) + 2 * (s.double() - r).abs().amax(-1, keepdim=True)
        err = (a.double() - r).abs()
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (
            f"{name} ({dtype}): |kernel - float64| = {err.flatten()[worst]:.3g} > "
            f"{bound.flatten()[worst]:.3g} at {worst.item()}; max error {err.max():.3g}")
    return got


MODES = {"lssa": None, "lssar-p1": 1.0, "lssar-p15": 15.0}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_matches_the_float64_reference_fp32_odd_lengths_head_dim_48(mode, causal):
    # Lq < Lk (causal: aligned to the end of the keys; Lk - Lq = 17 puts a row's last key
    # alone in a key tile of 16 under the interpreter) and, bidirectional, Lq > Lk
    lq, lk = (33, 50) if causal else (50, 37)
    q, k, v, grad_out = inputs(1, 1, 1, lq, lk, 48, seed=len(mode))
    check(q, k, v, grad_out, causal=causal, reweight_p=MODES[mode])


@pytest.mark.parametrize("mode", ["lssa", "lssar-p15"])
def test_gqa_key_padding_rows_that_see_no_key_and_few_keys_head_dim_64(mode):
    # causal over Lq = Lk: rows 0..2 of batch 1 see at most FEW_KEYS keys (no "- 1"); batch
    # 0's first half is padding, so its first rows see no key and return 0
    q, k, v, grad_out = inputs(2, 4, 2, 19, 19, 64, seed=3)
    mask = key_padding(2, 19)
    out = check(q, k, v, grad_out, causal=True, mask=mask, reweight_p=MODES[mode])[0]
    assert (out[0, :, :9] == 0).all() and (out[0, :, 9:] != 0).any()


@pytest.mark.parametrize("mode", ["lssa", "lssar-p15"])
def test_a_full_mask_per_row_with_a_fully_masked_row(mode):
    q, k, v, grad_out = inputs(2, 2, 1, 19, 23, 16, seed=4)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(2, 1, 19, 23, generator=g) > 0.4).to(DEVICE)
    mask[1, 0, 7] = False  # a row that sees no key
    mask[0, 0, 3] = False
    mask[0, 0, 3, :2] = True  # a row that sees two keys (FEW_KEYS: no "- 1")
    out = check(q, k, v, grad_out, causal=False, mask=mask, reweight_p=MODES[mode])[0]
    assert (out[1, :, 7] == 0).all()


def test_a_uniform_row_falls_back_to_its_lssa_weights():
    # every key alike: every LSSA row is uniform, N a - 1 = 0 up to rounding, so LSSAR keeps
    # the LSSA weights (the margin of _lssar_shift), forward and backward
    q, k, v, grad_out = inputs(1, 2, 1, 17, 19, 16, seed=6)
    k = k[:, :, :1].expand_as(k).contiguous()
    check(q, k, v, grad_out, causal=True, reweight_p=15.0)
    check(q, k, v, grad_out, causal=False, reweight_p=2.0)


@pytest.mark.parametrize("mode", ["lssa", "lssar-p15"])
def test_float16_within_per_dtype_tolerance(mode):
    q, k, v, grad_out = inputs(1, 2, 1, 19, 33, 16, dtype=torch.float16, seed=7)
    check(q, k, v, grad_out, causal=True, mask=key_padding(1, 33), reweight_p=MODES[mode])


@pytest.mark.parametrize("mode", ["lssa", "lssar-p15"])
def test_large_logits_stay_finite(mode):
    # alpha = 40 ln(N) ~ 150: softplus(x) ~ x for x > 0 and ~ e^x (tiny) for x < 0; e^x of
    # the logits would overflow float32
    q, k, v, grad_out = inputs(1, 2, 1, 19, 45, 16, seed=8)
    check(q, k, v, grad_out, causal=False, log_d=40.0, reweight_p=MODES[mode])


def test_rows_whose_every_logit_is_very_negative():
    # keys in the positive orthant, the first 5 queries in the negative one: their cosines are
    # in [-0.9, -0.3], so with alpha = 10 ln(45) ~ 38 every softplus(x) ~ e^x is between e^-35
    # and e^-12 (a log1p(e^x) taken as log(1 + e^x) loses most of its digits) while the
    # normalised weights are O(1)
    q, k, v, grad_out = inputs(1, 2, 1, 19, 45, 16, seed=8)
    k = k.abs()
    q[:, :, :5] = -q[:, :, :5].abs()
    out = check(q, k, v, grad_out, causal=False, log_d=10.0)[0]
    assert (out[:, :, :5].abs().amax(-1) > 0.1).all()


def test_compiled_fullgraph_and_exported_equal_eager():
    q, k, v, grad_out = inputs(1, 2, 1, 17, 19, 16, seed=9)
    mask = key_padding(1, 19)

    def f(q, k, v):
        return softplus_attention_triton(q, k, v, causal=True, mask=mask, log_d=2.5,
                                         reweight_p=3.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad((out * grad_out).sum(), leaves)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    exported = torch.export.export(Attention(), (q, k, v))
    torch.testing.assert_close(exported.module()(q, k, v), results[0][0], rtol=0, atol=0)


@pytest.mark.parametrize("what, reason", [
    ("float64", "float16, bfloat16 or float32"),
    ("head dim", "head dims 1..128"),
    ("mask", "bool mask"),
    ("power", "reweight_p >= 1"),
])
def test_what_the_kernel_refuses_is_explained(what, reason):
    q, k, v, _ = inputs(1, 2, 1, 3, 5, 160 if what == "head dim" else 8,
                        dtype=torch.float64 if what == "float64" else torch.float32)
    mask = torch.ones(1, 1, 1, 5, device=DEVICE) if what == "mask" else None
    p = 0.5 if what == "power" else None
    why = triton_limits(q, k, v, mask, p)
    assert why is not None and reason in why
    with pytest.raises(ValueError, match=reason):
        softplus_attention_triton(q, k, v, causal=False, mask=mask, log_d=1.0, reweight_p=p)
    assert triton_limits(q.float()[..., :8], k.float()[..., :8], v.float()[..., :8], None,
                         2.0) is None


@pytest.mark.slow
@pytest.mark.parametrize("d", [80, 96, 128])
@pytest.mark.parametrize("mode", ["lssa", "lssar-p15"])
def test_larger_head_dims_and_lengths(d, mode):
    q, k, v, grad_out = inputs(2, 4, 2, 45, 70, d, seed=10)
    check(q, k, v, grad_out, causal=True, mask=key_padding(2, 70), reweight_p=MODES[mode])


def test_auto_chooses_it_on_cuda_only_and_a_block_size_is_refused():
    q, k, v, _ = inputs(1, 2, 1, 5, 7, 16)
    verdicts = dict(explain("softplus_attention", "auto", BACKENDS, q, k, v))
    if DEVICE.type == "cuda":
        assert verdicts["triton"] == "chosen"
    else:  # the interpreter is for tests: auto never picks it for CPU tensors
        assert verdicts["triton"].startswith("skipped: auto uses the triton kernels on CUDA")
    with pytest.raises(ValueError, match="choose their own tiles"):
        softplus_attention(q, k, v, backend="triton", block_size=32)


def test_the_op_runs_the_kernel_when_triton_is_named(monkeypatch):
    """backend="triton" reaches the kernel (a wiring that fell through to another backend
    would still agree with the reference in every test above)."""
    import attnlab.ops.triton.softplus as kernels

    def refuse(*args, **kwargs):
        raise RuntimeError("kernel called")

    monkeypatch.setattr(kernels, "softplus_attention_triton", refuse)
    q, k, v, _ = inputs(1, 2, 1, 5, 7, 16)
    with pytest.raises(RuntimeError, match="kernel called"):
        softplus_attention(q, k, v, causal=True, backend="triton")
