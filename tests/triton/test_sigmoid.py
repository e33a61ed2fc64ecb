"""sigmoid_attention(backend="triton") against the op's float64 reference, forward and input
gradients (q, k, v and a per-head tensor bias), under Triton's interpreter on a machine
without CUDA (conftest), on CUDA tensors where there is a GPU.

Shapes stay small (the interpreter runs a few programs per second); the larger head dims
and lengths are marked ``slow``.
"""

from __future__ import annotations

import os

import pytest
import torch

from attnlab.ops.dispatch import explain
from attnlab.ops.sigmoid import BACKENDS, sigmoid_attention, triton_limits

# CUDA tensors where there is a GPU (the compiled kernels), else CPU ones (the interpreter)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# on a GPU, float32 tl.dot defaults to tf32: compare in full float32 (read at compile time)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance from the dtype's epsilon: fp32 sums a few dozen products in another
    order than the reference (32 ulps = 3.8e-6); fp16 rounds P and dS to fp16 before their
    products (as the reference rounds the weights), a few fp16 ulps (4 ulps = 3.9e-3)."""
    return torch.finfo(dtype).eps * (32 if dtype == torch.float32 else 4)


def inputs(b, h, hkv, lq, lk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, dv, generator=g)
    grad_out = torch.randn(b, h, lq, dv, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [grad_out.to(DEVICE)]


def key_padding(b, lk, seed=1):
    """(B, 1, 1, Lk); batch 0 is left-padded (its first causal rows see no key), and batch
    b-1 keeps only its last key."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, lk, generator=g) > 0.25
    keep[0, : max(1, lk // 2)] = False
    if b > 1:
        keep[-1] = False
        keep[-1, -1] = True
    return keep[:, None, None, :].to(DEVICE)


def run(q, k, v, grad_out, bias=None, **kw):
    """Output and gradients of q, k, v (and of a tensor bias) for sum(out * grad_out)."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    if isinstance(bias, torch.Tensor):
        leaves.append(bias.detach().requires_grad_(True))
        bias = leaves[-1]
    out = sigmoid_attention(*leaves[:3], bias=bias, **kw)
    grads = torch.autograd.grad((out.double() * grad_out.double()).sum(), leaves)
    return (out, *grads)


def check(q, k, v, grad_out, bias=None, **kw):
    """The triton backend against the reference on float64 copies of the same inputs."""
    dtype = q.dtype
    got = run(q, k, v, grad_out, bias=bias, backend="triton", **kw)
    wide = [t.double() for t in (q, k, v)]
    ref_bias = bias.double() if isinstance(bias, torch.Tensor) else bias
    ref = run(*wide, grad_out, bias=ref_bias, backend="reference", **kw)
    tol = tolerance(dtype)
    names = ("out", "dq", "dk", "dv", "dbias")
    assert got[0].dtype == dtype and got[0].shape == ref[0].shape
    for name, a, r in zip(names, got, ref, strict=False):
        assert torch.isfinite(a).all(), name
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * scale,
                                   msg=lambda m, name=name: f"{name} ({dtype}): {m}")


# (b, h, hkv, lq, lk, d, dv): odd lengths, fewer queries than keys (causal: aligned to the
# end) and more, GQA groups of 2 and 3, head dims padded in the kernel (8, 12) or not (16)
CASES = [(1, 2, 1, 17, 33, 8, 8), (2, 3, 1, 33, 17, 12, 16), (1, 2, 2, 1, 17, 32, 12),
         (1, 1, 1, 1, 1, 8, 8)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_the_float64_reference_fp32(shape, causal):
    q, k, v, grad_out = inputs(*shape)
    check(q, k, v, grad_out, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_with_rows_that_see_no_key(causal):
    q, k, v, grad_out = inputs(2, 2, 1, 17, 17, 8, 8)
    mask = key_padding(2, 17)
    check(q, k, v, grad_out, causal=causal, mask=mask)
    out = sigmoid_attention(q, k, v, causal=causal, mask=mask, backend="triton")
    assert (out[1, :, :, :] != 0).any()
    if causal:  # batch 0's first 8 keys are padding: its first 8 rows see nothing -> 0
        assert (out[0, :, :8] == 0).all()


def test_a_general_mask_per_head_and_row():
    q, k, v, grad_out = inputs(1, 2, 1, 17, 19, 8, 8)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 2, 17, 19, generator=g) > 0.5).to(DEVICE)
    mask[0, 1, 4] = False  # a row that sees no key
    check(q, k, v, grad_out, causal=True, mask=mask)


@pytest.mark.parametrize("bias", ["float", "per-head"])
def test_a_given_scale_and_bias_and_the_bias_gradient(bias):
    q, k, v, grad_out = inputs(1, 3, 1, 17, 17, 8, 8)
    b = 0.7 if bias == "float" else torch.tensor([-2.0, 0.5, 1.5]).view(3, 1, 1).to(DEVICE)
    check(q, k, v, grad_out, causal=True, scale=0.3, bias=b)


@pytest.mark.parametrize("causal", [False, True])
def test_float16_within_per_dtype_tolerance(causal):
    q, k, v, grad_out = inputs(1, 2, 1, 17, 33, 16, 16, dtype=torch.float16)
    check(q, k, v, grad_out, causal=causal, mask=key_padding(1, 33))


def test_block_size_picks_the_tiles():
    q, k, v, grad_out = inputs(1, 1, 1, 33, 33, 8, 8)
    check(q, k, v, grad_out, causal=True, block_size=32)


def test_a_hidden_non_finite_key_stays_out_and_a_seen_one_marks_its_rows():
    q, k, v, _ = inputs(1, 1, 1, 4, 4, 8, 8)
    k[0, 0, 3] = float("nan")
    out = sigmoid_attention(q, k, v, causal=True, backend="triton")
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isnan(out[0, 0, 3]).all()


@pytest.mark.parametrize("what, reason", [
    ("float64", "float16, bfloat16 or float32"),
    ("bias", "per-head tensor bias"),
    ("block", "power of two from 16 to 128"),
])
def test_what_the_kernel_refuses_is_explained(what, reason):
    q, k, v, _ = inputs(1, 2, 1, 3, 5, 8, 8, dtype=torch.float64 if what == "float64"
                        else torch.float32)
    bias = torch.zeros(1, 1, 1, 5, device=DEVICE) if what == "bias" else -1.0
    block = 24 if what == "block" else None
    why = triton_limits(q, v, bias, block)
    assert why is not None and reason in why
    verdict = dict(explain("sigmoid_attention", "triton", BACKENDS, q, k, v,
                           limits=lambda n: triton_limits(q, v, bias, block)))["triton"]
    assert verdict.startswith("refused:") and reason in verdict
    with pytest.raises(ValueError, match="backend 'triton' refused"):
        sigmoid_attention(q, k, v, bias=bias, block_size=block, backend="triton")


def test_auto_chooses_it_on_cuda_only():
    q, k, v, _ = inputs(1, 1, 1, 3, 3, 8, 8)
    verdicts = dict(explain("sigmoid_attention", "auto", BACKENDS, q, k, v))
    if DEVICE.type == "cuda":
        assert verdicts["triton"] == "chosen"
    else:  # the interpreter is for tests: auto never picks it for CPU tensors
        assert verdicts["triton"].startswith("skipped: auto uses the triton kernels on CUDA")


@pytest.mark.slow
@pytest.mark.parametrize("d, dv", [(32, 32), (48, 48), (80, 96)])
@pytest.mark.parametrize("causal", [False, True])
def test_larger_head_dims_and_lengths(d, dv, causal):
    q, k, v, grad_out = inputs(2, 4, 2, 67, 100, d, dv)
    check(q, k, v, grad_out, causal=causal, mask=key_padding(2, 100))


@pytest.mark.slow
def test_float16_larger():
    q, k, v, grad_out = inputs(2, 4, 2, 65, 65, 64, 64, dtype=torch.float16)
    check(q, k, v, grad_out, causal=True, mask=key_padding(2, 65))
