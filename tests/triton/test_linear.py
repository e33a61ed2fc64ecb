"""linear_attention(backend="triton") against the op's reference (the parallel form), forward
and input gradients: on CUDA tensors where there is CUDA, else on the CPU under Triton's
interpreter (conftest). On CUDA the kernels' fp32 products are full fp32 (tests/conftest.py
turns TF32 off, which the kernels follow), so the fp32 tolerances hold there too."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops.linear import linear_attention

# per-dtype tolerances: fp32 from its epsilon (the kernels sum in a different order than the
# reference's matmuls: a few ulps of the largest term), fp16 from the output's rounding
# (both backends compute in fp32 and round once at the end: one or two fp16 ulps)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(q, k, v, grad_out, **kw):
    """The output and the gradients of q, k, v for the loss sum(out * grad_out)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = linear_attention(q, k, v, **kw)
    grads = torch.autograd.grad((out.float() * grad_out).sum(), (q, k, v), allow_unused=True)
    return (out, *(torch.zeros_like(t) if g is None else g
                   for g, t in zip(grads, (q, k, v), strict=True)))


def assert_agree(got, ref, dtype):
    tol = TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = max(1.0, b.float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def inputs(b, h, hkv, lq, lk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(DEVICE, dtype)
    grad_out = torch.randn(b, h, lq, dv, generator=g).to(DEVICE)
    return q, k, v, grad_out


def compare(q, k, v, grad_out, dtype=torch.float32, **kw):
    got = run(q, k, v, grad_out, backend="triton", **kw)
    ref = run(q, k, v, grad_out, backend="reference", **kw)
    assert_agree(got, ref, dtype)
    return got, ref


# (causal, B, H, H_kv, Lq, Lk, D, Dv, chunk): odd lengths 1/17/33, head dims 8/12/16/32,
# several chunks (33 tokens in chunks of 16), cross lengths when bidirectional, GQA
CASES = [
    (True, 1, 2, 2, 1, 1, 8, 8, 16),
    (True, 2, 2, 2, 17, 17, 12, 12, 16),
    (True, 1, 4, 2, 33, 33, 16, 8, 16),
    (True, 1, 2, 1, 33, 33, 32, 32, 32),
    (True, 1, 2, 2, 17, 17, 8, 12, 64),
    (False, 1, 2, 2, 1, 1, 8, 8, 16),
    (False, 2, 2, 2, 17, 33, 12, 12, 16),
    (False, 1, 4, 2, 33, 17, 16, 8, 16),
    (False, 1, 2, 1, 17, 1, 32, 32, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-B{}H{}kv{}-L{}x{}-D{}x{}-C{}".format(
    "causal" if c[0] else "bidir", *c[1:]))
def test_matches_reference(case):
    causal, b, h, hkv, lq, lk, d, dv, chunk = case
    q, k, v, grad_out = inputs(b, h, hkv, lq, lk, d, dv)
    compare(q, k, v, grad_out, causal=causal, chunk_size=chunk)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(("feature_map", "normalize"),
                         [("identity", False), ("identity", True), ("elu", False),
                          ("relu", True)])
def test_feature_maps_and_normalisation(causal, feature_map, normalize):
    q, k, v, grad_out = inputs(1, 2, 1, 21, 21, 12, 8, seed=1)
    # identity features with normalize=True have denominators of either sign and near 0:
    # the sign-aware clamp at eps is then exercised; a larger eps keeps the ratio tame
    compare(q, k, v, grad_out, causal=causal, feature_map=feature_map, normalize=normalize,
            chunk_size=16, eps=0.5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_key_padding_with_rows_that_see_nothing(causal):
    b, h, hkv, length, d = 2, 4, 2, 33, 12
    q, k, v, grad_out = inputs(b, h, hkv, length, length, d, d, seed=2)
    mask = (torch.rand(b, 1, 1, length, generator=torch.Generator().manual_seed(3)) > 0.4
            ).to(DEVICE)
    mask[0, ..., :5] = False  # causal: batch 0's first five rows see no key
    mask[1] = False  # batch 1 sees no key at all
    got, _ = compare(q, k, v, grad_out, causal=causal, mask=mask, chunk_size=16)
    out, dq, dk, dv = got
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all()
    if causal:
        assert (out[0, :, :5] == 0).all()
    assert (dk[0, ..., :5, :] == 0).all() and (dv[0, ..., :5, :] == 0).all()  # padded keys


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype):
    """The op upcasts to fp32 before the kernels (so bfloat16 runs under the interpreter
    too): the results differ from the reference's by the final rounding only."""
    q, k, v, grad_out = inputs(1, 4, 2, 33, 33, 16, 16, dtype=dtype, seed=4)
    mask = torch.ones(1, 1, 1, 33, dtype=torch.bool, device=DEVICE)
    mask[..., 7] = False
    for causal in (True, False):
        got, _ = compare(q, k, v, grad_out, dtype, causal=causal, mask=mask, chunk_size=16)
        assert all(t.dtype == dtype for t in got)


def test_float64_math():
    """The fp32 kernels against the reference in float64: the error is fp32's own."""
    q, k, v, grad_out = inputs(1, 2, 2, 33, 33, 16, 16, seed=5)
    got = run(q, k, v, grad_out, backend="triton", causal=True, chunk_size=16)
    ref = run(q.double(), k.double(), v.double(), grad_out.double(), backend="reference",
              causal=True)
    for a, b in zip(got, ref, strict=True):
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 1e-6, err


def test_nonfinite_keys_stay_the_guards():
    q, k, v, grad_out = inputs(1, 2, 2, 17, 17, 8, 8, seed=6)
    k[0, 1, 9, 3] = float("nan")
    v[0, 0, 12, 0] = float("inf")
    for causal in (True, False):
        got = linear_attention(q, k, v, causal=causal, backend="triton", chunk_size=16)
        ref = linear_attention(q, k, v, causal=causal, backend="reference")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
        if causal:  # head 0's bad key is key 12: the rows before it stay finite
            assert not got[0, 0, :12].isnan().any() and got[0, 0, 12:].isnan().all()
        else:
            assert got[0, 0].isnan().all()


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"causal": True, "return_state": True}, "takes no state"),
    ({"chunk_size": 24}, "chunk_size in"),
    ({"mask": torch.ones(1, 2, 5, 5, dtype=torch.bool, device=DEVICE)}, "key padding mask"),
    ({"causal": True, "q_len": 3}, "as many queries as keys"),
    ({"dtype": torch.float64}, "computes in float32"),
])
def test_refusals_say_why(kwargs, reason):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    q, k, v, _ = inputs(1, 2, 2, kwargs.pop("q_len", 5), 5, 8, 8, dtype=dtype)
    with pytest.raises(ValueError, match=f"backend 'triton' refused: .*{reason}"):
        linear_attention(q, k, v, backend="triton", **kwargs)


def test_auto_chooses_triton_on_cuda_only():
    from attnlab.ops.dispatch import recorded

    q, k, v, _ = inputs(1, 2, 2, 70, 70, 8, 8)
    with recorded() as calls:
        linear_attention(q, k, v, causal=True)
    (_, verdicts), = calls
    if DEVICE == "cuda":
        assert verdicts[0] == ("triton", "chosen")
    else:  # the interpreter is for tests: auto takes the chunked form on the CPU
        assert verdicts[0][0] == "triton" and verdicts[0][1].startswith("skipped: auto uses")
        assert "CUDA only" in verdicts[0][1]
        assert verdicts[1] == ("chunked", "chosen")


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_larger_shapes(causal):
    q, k, v, grad_out = inputs(2, 4, 2, 257, 257, 48, 80, seed=7)
    mask = (torch.rand(2, 1, 1, 257, generator=torch.Generator().manual_seed(8)) > 0.2
            ).to(DEVICE)
    compare(q, k, v, grad_out, causal=causal, mask=mask, chunk_size=64)
