"""Meta-device (FSDP-style) initialisation of every mechanism: build under
``torch.device("meta")``, ``to_empty(device="cpu")``, ``reset_parameters()``
(docs/contract.md, "Meta-device initialisation").

Cases: every mechanism, its default configuration, its registered variants and the common
options (GQA, qk-norm, RoPE, gate), in each mode it supports (the snapshot's cases).

- ``test_reset_equals_build``: after the same ``torch.manual_seed`` the reset module equals
  the built one exactly (every parameter and buffer, non-persistent ones included): the reset
  draws the same random numbers in the same order. The materialised memory is filled with NaN
  first, so anything the reset leaves untouched shows.
- ``test_reset_statistics``: with another seed, every tensor has the built one's shape and
  dtype, is finite, equals it exactly where the constructor's init is deterministic (zeros,
  ones, identity, fixed tables, RFA's seeded features: equal across two builds with different
  seeds), and otherwise has its mean and standard deviation within a tolerance that shrinks
  with the number of elements (and grows with the distribution's kurtosis; a positive
  random init, GAAM's exp(N(0, 1)) scales, is compared on the log scale).
- ``test_meta_load_assign``: build on meta + ``load_state_dict(state, assign=True)`` gives the
  original module's outputs (RoPE's frequencies, a non-persistent buffer, are recomputed).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import attnlab as al
from tests.snapshot.record import HEADS, cases, width

CASES = {case_id: (name, kwargs, causal) for case_id, name, kwargs, causal in cases()}
IDS = sorted(CASES)


def _build(case_id: str, seed: int = 0, *, meta: bool = False) -> al.Attention:
    name, kwargs, causal = CASES[case_id]
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return al.build(name, dim=width(name), heads=HEADS, causal=causal, **kwargs)
    return al.build(name, dim=width(name), heads=HEADS, causal=causal, **kwargs)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (non-persistent buffers included)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _materialise(case_id: str, seed: int) -> al.Attention:
    """Built on meta, moved to the CPU with NaN (or -1) in every tensor, reset after
    ``torch.manual_seed(seed)``."""
    attn = _build(case_id, meta=True)
    assert all(t.is_meta for t in _tensors(attn).values())
    attn.to_empty(device="cpu")
    with torch.no_grad():
        for t in _tensors(attn).values():
            t.fill_(math.nan if t.is_floating_point() else -1)
    torch.manual_seed(seed)
    attn.reset_parameters()
    return attn


@pytest.mark.parametrize("case_id", IDS)
def test_reset_equals_build(case_id):
    built, reset = _build(case_id), _materialise(case_id, seed=0)
    a, b = _tensors(built), _tensors(reset)
    assert a.keys() == b.keys()
    for key, t in a.items():
        assert t.dtype == b[key].dtype and t.device == b[key].device, key
        assert torch.equal(t, b[key]), f"{case_id}: {key} differs from a seeded build"


@pytest.mark.parametrize("case_id", IDS)
def test_reset_statistics(case_id):
    built, other = _tensors(_build(case_id)), _tensors(_build(case_id, seed=1))
    reset = _tensors(_materialise(case_id, seed=2))
    for key, t in built.items():
        r = reset[key]
        assert r.shape == t.shape and r.dtype == t.dtype, key
        if not t.is_floating_point():
            assert torch.equal(r, t), key
            continue
        assert torch.isfinite(r).all(), f"{case_id}: {key} holds non-finite values"
        if torch.equal(t, other[key]):  # a deterministic init: exactly the constructor's
            assert torch.equal(r, t), f"{case_id}: {key} differs from its fixed init"
            continue
        n = t.numel()
        t, r, o = (v.detach().double().flatten() for v in (t, r, other[key]))
        if (t > 0).all() and (o > 0).all():  # a positive init is multiplicative (GAAM's
            t, r, o = t.log(), r.log(), o.log()  # exp(N(0, 1)) scales): compare its logs
        pool = torch.cat([t, o])
        spread = pool.std().item()
        centred = pool - pool.mean()
        kurtosis = (centred ** 4).mean().item() / max((centred ** 2).mean().item(), 1e-300) ** 2
        # of n draws, the mean moves by spread / sqrt(n) and the std by spread *
        # sqrt((kurtosis - 1) / 4n) (kurtosis 3 for a normal, 1.8 for a uniform); their
        # difference between two samples by sqrt(2) of that; six of these
        mean_tol = 6 * math.sqrt(2) * spread / math.sqrt(n)
        std_tol = 6 * math.sqrt(2) * spread * math.sqrt(max(kurtosis - 1, 0.5) / (4 * n))
        assert abs(r.mean() - t.mean()) <= mean_tol, f"{case_id}: {key} mean"
        if n > 1:
            assert abs(r.std() - t.std()) <= std_tol, f"{case_id}: {key} std"


def _inputs(attn: al.Attention, name: str) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, attn.dim, generator=g)
    calls = [dict(x=x)]
    if "image" in al.info(name).domains:
        calls.append(dict(x=torch.randn(2, 3, 3, attn.dim, generator=g)))
    return calls


@pytest.mark.parametrize("case_id", IDS)
def test_meta_load_assign(case_id):
    name = CASES[case_id][0]
    original = _build(case_id).eval()
    loaded = _build(case_id, meta=True)
    loaded.load_state_dict(original.state_dict(), assign=True)
    loaded.eval()
    for call in _inputs(original, name):
        with torch.no_grad():
            torch.testing.assert_close(loaded(**call), original(**call), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "cca"])
def test_rope_frequencies_stay_float32(name):
    """``.to(torch.bfloat16)`` keeps RoPE's frequencies float32 (rounded to bf16 they move
    the angles at position 2048 by up to 2048 * 2^-9 of a frequency); ``.double()`` widens
    them exactly; meta build + ``to_empty`` recomputes them."""
    attn = al.build(name, dim=32, heads=4, rope=True)
    exact = attn.rotary.frequencies()
    assert attn.rotary.inv_freq.dtype == torch.float32
    assert "rotary.inv_freq" not in attn.state_dict()
    half = attn.to(torch.bfloat16)
    assert half.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(half.rotary.inv_freq, exact)
    assert half.qkv.q.weight.dtype == torch.bfloat16
    wide = half.double()
    assert wide.rotary.inv_freq.dtype == torch.float64
    assert torch.equal(wide.rotary.inv_freq, exact.double())
    with torch.device("meta"):
        meta = al.build(name, dim=32, heads=4, rope=True)
    meta.to_empty(device="cpu")  # recomputed on the move already, reset or not
    assert torch.equal(meta.rotary.inv_freq, exact)
    meta.rotary.inv_freq.fill_(math.nan)
    meta.reset_parameters()
    assert torch.equal(meta.rotary.inv_freq, exact)


def test_rope_bf16_module_matches_float32_angles():
    """A bf16 module rotates by the float32 angles (cast to bf16 once), not by angles from
    bf16-rounded frequencies: at position 2048 these differ by far more than bf16's rounding."""
    attn = al.build("softmax", dim=64, heads=2, rope=True)
    rot = attn.rotary
    x = torch.randn(1, 2, 1, 32)
    positions = torch.tensor([2048])
    expected = rot(x.to(torch.bfloat16), positions)
    rot_bf16 = rot.to(torch.bfloat16)
    assert torch.equal(rot_bf16(x.to(torch.bfloat16), positions), expected)
    rounded = rot.inv_freq.to(torch.bfloat16).float()
    angles = positions.float()[:, None] * rounded[None]
    assert (angles - positions.float()[:, None] * rot.inv_freq[None]).abs().max() > 0.1


def test_contract_md_snippet_runs():
    """The example of docs/contract.md's "Meta-device initialisation" runs as shown."""
    doc = (Path(__file__).parents[2] / "docs" / "contract.md").read_text()
    # the section's own text, before its subsections (the FSDP2 one needs two processes:
    # tests/distributed/test_fsdp2.py runs that recipe)
    section = doc.split("## Meta-device initialisation", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code, "contract.md", "exec"), {})
