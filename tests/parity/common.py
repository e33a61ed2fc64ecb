"""Helpers of the parity tests: each test re-expresses a paper's official module in float64,
in the official parameter layout, maps its weights into the attnlab module and compares the
forward output, the input gradient and every mapped parameter gradient."""

from __future__ import annotations

from torch import Tensor

RTOL = 1e-10  # of each compared tensor's scale: its largest magnitude, at least 1


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| over the scale of ``want``: its largest magnitude, at least 1 (inputs,
    weights and the loss weights are O(1), so a gradient that is mathematically 0, e.g. of a
    key bias under softmax, holds rounding noise of that size, not of its own)."""
    scale = want.detach().abs().max().clamp_min(1.0)
    return ((got.detach() - want.detach()).abs().max() / scale).item()


def assert_parity(pairs: dict[str, tuple[Tensor, Tensor]], rtol: float = RTOL) -> dict:
    """``pairs``: name -> (attnlab tensor, official tensor); every one within ``rtol`` of the
    official tensor's scale. Returns the errors (for the reports)."""
    errors = {}
    for name, (got, want) in pairs.items():
        assert got is not None and want is not None, f"{name}: missing gradient"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        errors[name] = relative_error(got, want)
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"differences above {rtol} of scale: {bad}"
    return errors


def leaf(t: Tensor) -> Tensor:
    """A float64 leaf copy that records its gradient."""
    return t.detach().double().clone().requires_grad_()
