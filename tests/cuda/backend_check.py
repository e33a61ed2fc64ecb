"""One check shared by the CUDA tests and their CPU self-test: a fast backend of an op against
the op's reference computed in float64 on the same device, forward and backward."""

from __future__ import annotations

import torch

import attnlab.ops as ops

# (op, fast backend, reference backend, extra kwargs)
FAST_PATHS = [
    ("softmax_attention", "sdpa", "reference", {}),
    ("softmax_attention", "flex", "reference", {}),
    ("sigmoid_attention", "flex", "reference", {}),
    ("sigmoid_attention", "tiled", "reference", {}),
    ("softplus_attention", "flex", "reference", {}),
    ("softplus_attention", "tiled", "reference", {}),
    ("softplus_attention", "flex", "reference", {"reweight_p": 15.0}),
    ("softplus_attention", "tiled", "reference", {"reweight_p": 15.0}),
    ("neighborhood_attention", "flex", "reference", {"kernel_size": 7}),
    ("neighborhood_attention", "tiled", "reference", {"kernel_size": 7}),
    ("linear_attention", "chunked", "parallel", {}),
    ("linear_attention", "recurrent", "parallel", {}),
    ("local_linear_attention", "chunked", "reference", {}),
    ("random_feature_attention", "tiled", "reference", {}),
]
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2}  # max error / max |reference|


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def compare(op_name: str, backend: str, reference: str, kwargs: dict, *, device: str,
            dtype: torch.dtype, length: int = 77, causal: bool = True,
            head_dim: int = 32) -> dict[str, float]:
    """Relative errors of the output and of dq, dk, dv (GQA 4 query / 2 kv heads)."""
    op = getattr(ops, op_name)
    g = torch.Generator().manual_seed(0)
    # inputs rounded to ``dtype`` first: the reference sees the same values, so what is
    # measured is the backend's arithmetic, not the rounding of its inputs
    q, k, v = (torch.randn(2, heads, length, head_dim, generator=g).to(dtype)
               for heads in (4, 2, 2))
    grad = torch.randn(2, 4, length, head_dim, generator=g).to(dtype)
    if op_name != "neighborhood_attention":
        kwargs = {**kwargs, "causal": causal}

    def run(which: str, as_dtype: torch.dtype):
        leaves = [t.to(device, as_dtype).requires_grad_() for t in (q, k, v)]
        out = op(*leaves, backend=which, **kwargs)
        out.backward(grad.to(device, as_dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    want = run(reference, torch.float64)
    got = run(backend, dtype)
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a is not None, f"{backend} gave no {name}"
        assert a.dtype == dtype, f"{name} came back in {a.dtype}, not {dtype}"
        assert b.abs().max() > 0, f"the reference's {name} is all zero: nothing is checked"
        errors[name] = relative_error(a, b)
    return errors
