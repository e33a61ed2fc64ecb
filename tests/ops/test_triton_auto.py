"""``backend="auto"`` and the triton kernels (issue 36): preferred on CUDA where triton
imports, never chosen on another device (the interpreter is for tests), and
``ATTNLAB_TRITON_AUTO=0`` turns the preference off; a named backend is unaffected."""

from __future__ import annotations

import pytest

from attnlab.ops import triton as kernels


@pytest.fixture
def triton_installed(monkeypatch):
    monkeypatch.setattr(kernels, "importable", lambda: True)
    monkeypatch.delenv(kernels.AUTO_SWITCH, raising=False)


def test_auto_prefers_the_kernels_on_cuda(triton_installed):
    assert kernels.why_not("cuda", auto=True) is None


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_never_chooses_them_off_cuda(triton_installed, monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    reason = kernels.why_not("cpu", auto=True)
    assert reason is not None and "CUDA only" in reason


def test_the_switch_turns_auto_off(triton_installed, monkeypatch):
    monkeypatch.setenv(kernels.AUTO_SWITCH, "0")
    reason = kernels.why_not("cuda", auto=True)
    assert reason is not None and kernels.AUTO_SWITCH in reason
    assert kernels.why_not("cuda", auto=False) is None  # named: still served


def test_without_triton_nothing_chooses_them(monkeypatch):
    monkeypatch.setattr(kernels, "importable", lambda: False)
    for auto in (True, False):
        reason = kernels.why_not("cuda", auto=auto)
        assert reason is not None and "not installed" in reason


def test_every_op_with_kernels_lists_triton_first():
    from attnlab.ops import decode, linear, sigmoid

    for op in (sigmoid, linear, decode):
        assert op.BACKENDS[0] == "triton", op.__name__


def test_decode_auto_takes_the_kernel_where_the_dispatcher_allows_and_it_can_serve(
        monkeypatch):
    """decode_attention resolves auto itself (fused / split): it takes triton when the
    dispatcher's conditions hold (CUDA; simulated here) and the call is inference."""
    import torch

    from attnlab.ops.decode import _backend

    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 32, 8)
    assert _backend("auto", None, q, k, k) != "triton"  # CPU tensors: never
    monkeypatch.setattr(kernels, "why_not", lambda device, *, auto: None)  # as on CUDA
    with torch.no_grad():
        assert _backend("auto", None, q, k, k) == "triton"
    q.requires_grad_(True)  # a backward is wanted: the kernel has none
    assert _backend("auto", None, q, k, k) == "split"
