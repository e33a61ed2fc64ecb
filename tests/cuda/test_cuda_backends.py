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


def test_cuda_decode_fused_path_masks_padding_and_guards_non_finite_keys():
    """On a GPU, splits=None hands the step to SDPA's fused kernels: a padded cache (a row
    with no visible key gives 0), and a non-finite key makes only its kv head's rows NaN."""
    import attnlab.ops as ops

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 1, 64, generator=g)
    k, v = (torch.randn(2, 2, 3000, 64, generator=g) for _ in range(2))
    keep = torch.ones(2, 1, 1, 3000, dtype=torch.bool)
    keep[0, ..., :1000] = False
    keep[1] = False  # nothing visible: zeros
    want = ops.softmax_attention(q.double(), k.double(), v.double(), mask=keep,
                                 backend="reference")
    for dtype in TOLERANCE:
        got = ops.decode_attention(*(t.to("cuda", dtype) for t in (q, k, v)),
                                   mask=keep.cuda()).double().cpu()
        assert (got[1] == 0).all()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= TOLERANCE[dtype], (dtype, err)
    k[0, 1, 2500, 3] = float("-inf")  # visible, and scored -inf by some queries
    got = ops.decode_attention(*(t.cuda() for t in (q, k, v)))
    assert torch.isnan(got[0, 4:]).all() and torch.isfinite(got[0, :4]).all()
    assert torch.isfinite(got[1]).all()
