"""Every fast path's CUDA backend against its reference, forward and backward, fp32 and bf16
(marked ``cuda``: skipped on a machine without a GPU; run with ``pytest -m cuda``)."""

import pytest
import torch

from tests.cuda.backend_check import FAST_PATHS, TOLERANCE, compare

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("case", FAST_PATHS, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}")
def test_cuda_backend_matches_reference(case, causal, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    op_name, backend, reference, kwargs = case
    errors = compare(op_name, backend, reference, kwargs, device="cuda", dtype=dtype,
                     causal=causal)
    assert max(errors.values()) <= TOLERANCE[dtype], errors


def test_cuda_decode_matches_softmax_reference():
    import attnlab.ops as ops

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 3, 64, generator=g)
    k, v = (torch.randn(2, 2, 1001, 64, generator=g) for _ in range(2))
    want = ops.softmax_attention(q.double(), k.double(), v.double(), causal=True,
                                 backend="reference")
    for dtype in TOLERANCE:
        got = ops.decode_attention(*(t.to("cuda", dtype) for t in (q, k, v)), causal=True)
        err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
        assert err <= TOLERANCE[dtype], (dtype, err)
