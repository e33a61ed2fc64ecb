"""Helpers of the parity tests: each test re-expresses a paper's official module in float64,
in the official parameter layout, maps its weights into the attnlab module and compares the
forward output, the input gradient and every mapped parameter gradient."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

RTOL = 1e-10  # of each compared tensor's scale: its largest magnitude, at least 1

# largest error each test module reached, filled by assert_parity (read by tests/parity/table.py)
REACHED: dict[str, float] = {}


@dataclass(frozen=True)
class Official:
    """What a parity test module compares with; each ``tests/parity/test_<mechanism>.py``
    declares one as ``OFFICIAL`` and ``python -m tests.parity.table`` writes the parity table
    of docs/mechanisms/parity.md from them and the errors the tests reach.

    ``code``: "owner/repo @ commit, path, class" of the official module, or, where there is
    none, "none: <why>" (then ``checked_against`` says what the test compares with instead);
    ``differences``: every remaining difference of attnlab's default from that module, each
    with its reason (empty: equal)."""

    mechanism: str
    code: str
    checked_against: str = "its float64 re-expression (output, input and parameter gradients)"
    differences: tuple[str, ...] = ()


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
    module = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    if module and errors:
        REACHED[module] = max(REACHED.get(module, 0.0), *errors.values())
    return errors


def leaf(t: Tensor) -> Tensor:
    """A float64 leaf copy that records its gradient."""
    return t.detach().double().clone().requires_grad_()


def linear(p: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    """The official layout's ``name`` projection (``name.weight``, ``name.bias`` if any)."""
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def rms(t: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as Hugging Face's (Qwen3, Doge): eps inside the root."""
    return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))


def compare_with_official(attn: nn.Module, p: dict[str, Tensor], names: dict[str, str],
                          x: Tensor, weight: Tensor, y_official: Tensor,
                          x_official: Tensor, mask: Tensor | None = None) -> dict:
    """Copy the official parameters ``p`` into ``attn`` (``names``: attnlab name -> official
    name, every parameter mapped both ways), run it on ``x`` with the loss (y * weight).sum()
    and compare output, input gradient and every parameter gradient with the official run
    (whose loss was backpropagated already). ``mask``: key padding (B, L) passed to ``attn``;
    padded rows are zero tokens' rows there (the contract), so the outputs are compared on the
    real rows (``weight`` should be 0 on the padded ones)."""
    own = dict(attn.named_parameters())
    assert {names[n] for n in own} == set(p), "every parameter mapped, both ways"
    with torch.no_grad():
        for mine, t in own.items():
            t.copy_(p[names[mine]])
    xa = leaf(x)
    y = attn(xa) if mask is None else attn(xa, mask=mask)
    (y * weight).sum().backward()
    real = 1.0 if mask is None else mask[..., None]
    pairs = {"out": (y * real, y_official * real), "grad x": (xa.grad, x_official.grad)}
    for mine, t in own.items():
        pairs[f"grad {mine}"] = (t.grad, p[names[mine]].grad)
    return assert_parity(pairs)


def hf_rotate(t: Tensor, base: float = 10000.0) -> Tensor:
    """Hugging Face's RoPE of (.., N, D) at positions 0..N-1: angles in float32 (as HF
    computes them), halves rotated (channel i with i + D/2)."""
    n, d = t.shape[-2], t.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    ang = torch.arange(n).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(t.dtype), ang.sin().to(t.dtype)
    return t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin
