"""The Triton kernels compiled on CUDA at model-sized shapes (issue 36: "the same tests run on
CUDA at larger shapes under ``-m cuda``"): sigmoid and linear attention forward and backward,
split-KV decode, against each op's reference in float64 on the same GPU, bf16 and fp32, head
dims 64 / 96 / 128, lengths 1000 to 4096 (caches to 32k), GQA, key padding; and the custom
ops compiled with ``fullgraph=True`` (aot_eager and inductor) equal eager. tests/triton runs
the same kernels at small shapes under Triton's interpreter on a CPU.

Marked ``cuda`` and skipped without a GPU (``pytest -m cuda tests/cuda``, or
``benchmarks/gpu_suite.sh``). The sigmoid kernel's float32 products use Triton's default dot
precision, TF32 on a GPU: float32 comparisons need ``TRITON_F32_DEFAULT=ieee``, set here
before any kernel compiles (the suite sets it too); torch's own TF32 is turned off, which the
linear kernels follow.

Tolerance, from the dtypes: the error, max |got - reference| / max |reference|, is at most
4 roundings in the input dtype (P or dS rounded before its product with V, dO, K or Q, and
the output rounded) plus one float32 rounding per term of the longest sum (the kernels
accumulate in float32): ``4 eps(dtype) + L eps(float32)``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from attnlab.ops import decode_attention, linear_attention, sigmoid_attention
from tests.tolerances import eps

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton", reason="the triton extra is not installed")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # read when a kernel compiles

DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def tolerance(dtype: torch.dtype, terms: int) -> float:
    return 4 * eps(dtype) + terms * eps(torch.float32)


def relative_error(got: Tensor, want: Tensor) -> float:
    assert want.abs().max() > 0, "the reference is all zero: nothing is checked"
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def inputs(b: int, h: int, h_kv: int, lq: int, lk: int, d: int, dtype: torch.dtype,
           seed: int = 0) -> tuple[Tensor, ...]:
    """q, k, v and an output gradient, rounded to ``dtype`` on the CPU (the float64
    reference sees the same values), on the GPU."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, h, lq, d), (b, h_kv, lk, d), (b, h_kv, lk, d), (b, h, lq, d))
    return tuple(torch.randn(*s, generator=g).to(dtype).cuda() for s in shapes)


def key_padding(b: int, lk: int) -> Tensor:
    """(B, 1, 1, Lk): batch 0 keeps its last two thirds of the keys, the others all."""
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    keep[0, ..., : lk // 3] = False
    return keep.cuda()


def grads(op, q: Tensor, k: Tensor, v: Tensor, grad: Tensor, *extra: Tensor, **kw
          ) -> list[Tensor]:
    """op's output and the gradients of q, k, v (and of ``extra`` tensors passed as bias)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, *extra)]
    if extra:
        kw["bias"] = leaves[3]
    out = op(*leaves[:3], **kw)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def check_against_float64(op, q: Tensor, k: Tensor, v: Tensor, grad: Tensor,
                          *extra: Tensor, terms: int, **kw) -> None:
    dtype = q.dtype
    got = grads(op, q, k, v, grad, *extra, backend="triton", **kw)
    want = grads(op, *(t.double() for t in (q, k, v, grad, *extra)), backend="reference", **kw)
    tol = tolerance(dtype, terms)
    names = ("out", "dq", "dk", "dv", "dbias")
    dtypes = (dtype,) * 4 + tuple(t.dtype for t in extra)
    for name, a, b, want_dtype in zip(names, got, want, dtypes, strict=False):
        assert a.dtype == want_dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = relative_error(a, b)
        assert err <= tol, f"{name} ({dtype}): {err:.2e} > {tol:.2e}"


@DTYPES
@CAUSAL
@pytest.mark.parametrize("length, d", [(1000, 64), (4096, 128)], ids=["L1000-D64", "L4096-D128"])
def test_sigmoid_forward_and_backward(dtype, causal, length, d):
    q, k, v, grad = inputs(2, 8, 2, length, length, d, dtype)
    check_against_float64(sigmoid_attention, q, k, v, grad, terms=length, causal=causal)


def test_sigmoid_padding_per_head_bias_and_a_padded_head_dim():
    """bf16, head dim 96 (padded to 128 in the kernel), fewer queries than keys, key padding,
    a per-head tensor bias and its gradient."""
    q, k, v, grad = inputs(2, 8, 2, 1500, 2048, 96, torch.bfloat16, seed=1)
    bias = torch.linspace(-9.0, -6.0, 8).view(8, 1, 1).cuda()
    check_against_float64(sigmoid_attention, q, k, v, grad, bias, terms=2048, causal=True,
                          mask=key_padding(2, 2048))


@DTYPES
@CAUSAL
@pytest.mark.parametrize("d", [64, 128])
def test_linear_forward_and_backward(dtype, causal, d):
    q, k, v, grad = inputs(2, 8, 2, 4096, 4096, d, dtype)
    check_against_float64(linear_attention, q, k, v, grad, terms=4096, causal=causal,
                          mask=key_padding(2, 4096))


@DTYPES
@pytest.mark.parametrize("lq", [1, 4])
@pytest.mark.parametrize("cache", [4096, 32768])
def test_decode_long_caches(dtype, lq, cache):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).cuda()
               for s in ((2, 16, lq, 128), (2, 4, cache, 128), (2, 4, cache, 128)))
    keep = key_padding(2, cache)
    with torch.no_grad():
        got = decode_attention(q, k, v, causal=True, mask=keep, backend="triton")
        want = decode_attention(q.double(), k.double(), v.double(), causal=True, mask=keep,
                                backend="reference")
    assert got.dtype == dtype and got.shape == want.shape
    err = relative_error(got, want)
    assert err <= tolerance(dtype, cache), err


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fullgraph_equals_eager(backend):
    """The custom ops inside a compiled graph (projections and a residual around them, which
    inductor fuses and generates kernels for): forward and backward as eager, up to the
    rounding of those surrounding ops in bf16 (inductor may fuse them in another order)."""
    q, k, v, grad = inputs(2, 8, 2, 1024, 1024, 64, torch.bfloat16, seed=3)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    w = (w / 8).cuda()

    def block(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = sigmoid_attention(q @ w, k, v, causal=True, backend="triton")
        lin = linear_attention(q, k @ w, v, causal=True, backend="triton")
        return s + lin + q

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    got = grads(compiled, q, k, v, grad)
    want = grads(block, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = relative_error(a, b.double())
        assert err <= tolerance(torch.bfloat16, 64), f"{name}: {err:.2e}"
    with torch.no_grad():
        cache_q = q[:, :, -1:]
        step = torch.compile(lambda q, k, v: decode_attention(q, k, v, backend="triton"),
                             fullgraph=True, backend=backend)
        torch.testing.assert_close(step(cache_q, k, v),
                                   decode_attention(cache_q, k, v, backend="triton"),
                                   rtol=0, atol=0)
