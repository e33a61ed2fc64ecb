"""The CUDA tests' check, run on the CPU backends: it passes on the real fast paths and fails
on a planted bug (so the CUDA tests can fail)."""

import pytest
import torch

import attnlab.ops.sigmoid as sigmoid_module
from tests.cuda.backend_check import FAST_PATHS, TOLERANCE, compare

CPU_PATHS = [c for c in FAST_PATHS if c[1] != "flex"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CPU_PATHS, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}")
def test_cpu_fast_paths_pass_the_check(case, dtype):
    op_name, backend, reference, kwargs = case
    errors = compare(op_name, backend, reference, kwargs, device="cpu", dtype=dtype,
                     length=45, head_dim=8)
    assert max(errors.values()) <= TOLERANCE[dtype], errors


def test_the_check_fails_on_a_wrong_backward(monkeypatch):
    """A tiled sigmoid whose backward drops the gradient of k is caught."""
    real = sigmoid_module.sigmoid_attention

    def wrong(q, k, v, **kwargs):
        if kwargs.get("backend") == "tiled":
            return real(q, k.detach(), v, **kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr("attnlab.ops.sigmoid_attention", wrong)
    with pytest.raises(AssertionError, match="gave no dk"):
        compare("sigmoid_attention", "tiled", "reference", {}, device="cpu",
                dtype=torch.float32, length=45, head_dim=8)


def test_the_check_fails_on_a_wrong_forward(monkeypatch):
    real = sigmoid_module.sigmoid_attention

    def wrong(q, k, v, **kwargs):
        out = real(q, k, v, **kwargs)
        return out * 1.001 if kwargs.get("backend") == "tiled" else out

    monkeypatch.setattr("attnlab.ops.sigmoid_attention", wrong)
    errors = compare("sigmoid_attention", "tiled", "reference", {}, device="cpu",
                     dtype=torch.float32, length=45, head_dim=8)
    assert errors["out"] > TOLERANCE[torch.float32]
