"""Every mechanism reproduces the recorded behaviour snapshot (see record.py), in float64.

Tolerance: ``RTOL`` of each observable's scale (its largest magnitude, at least 1: the inputs,
weights and loss weights are O(1), so a gradient that is mathematically 0 holds only rounding
noise of that size). Derivation: float64 rounds with u = 1.1e-16; a reordered sum of n terms
moves by at most n u times the sum of their magnitudes; an observable here passes through
~20 reductions (projections, scores, weights, their backward) of at most 64 terms each, and
the worst-conditioned step (cca's L2 norm of 2-wide vectors as short as 0.02) amplifies by
~50: 20 * 64 * 50 * 1.1e-16 = 7e-12, so 1e-10 leaves a margin of ten over the bound. Measured
on an AMD EPYC against a recording made there with AVX-512: ``ATEN_CPU_CAPABILITY=default``
1.5e-14 of the scale at most, ``avx2`` 1.4e-15, one thread instead of two 6.6e-13 (SOFT's
iterative pseudo-inverse). A change of behaviour moves results by far more: a float32 step
anywhere by ~1e-9 to 1e-7 (sparsifiner's distillation loss in float32 moved its loss by 9e-9
of its scale between CPUs: the test caught it), a changed constant or formula by more.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import record

SNAPSHOT = record.load()
CASES = {case_id: (name, kwargs, causal) for case_id, name, kwargs, causal in record.cases()}
RTOL = 1e-10  # of an observable's scale; see the module docstring

# Parameter and buffer names that a refactoring renamed: old name prefix -> new one, for
# every mechanism, then per mechanism (the parts refactoring moved q, k, v into ``qkv``).
RENAMES: dict[str, str] = {"q_proj": "qkv.q", "k_proj": "qkv.k", "v_proj": "qkv.v",
                           "q_norm": "qk_norm.q", "k_norm": "qk_norm.k"}
RENAMES_OF: dict[str, dict[str, str]] = {
    "soft": {"q_proj": "qkv.qk"},
    "rfa": {"random_qk": "qkv.random_qk"},
    "mil_attention": {"branch": "qkv.branch", "k_proj": "qkv.features",
                      "gate_proj": "qkv.gate"},
    "cca": {"conv_depthwise": "qkv.conv_depthwise", "conv_heads": "qkv.conv_heads",
            "key_temperature": "qkv.key_temperature"},
    "rcmha": {"conv_q": "qkv.conv_q", "conv_k": "qkv.conv_k", "conv_v": "qkv.conv_v"},
}


def renamed(key: str, name: str) -> str:
    """A recorded parameter name (or ``grad.<name>``) of mechanism ``name`` as the current
    code spells it."""
    for old, new in {**RENAMES, **RENAMES_OF.get(name, {})}.items():
        for prefix in ("", "grad."):
            if key.startswith(prefix + old + ".") or key == prefix + old:
                return prefix + new + key[len(prefix + old):]
    return key


def test_every_recorded_case_still_exists():
    """The snapshot fixes the behaviour of the mechanisms that existed when it was recorded;
    a mechanism added later has no entry (and needs none), one removed or renamed fails."""
    missing = sorted(set(SNAPSHOT) - set(CASES))
    assert not missing, f"recorded cases that no longer exist: {missing[:5]}"
    assert len(SNAPSHOT) >= 162


@pytest.mark.parametrize("case_id", sorted(SNAPSHOT))
def test_mechanism_reproduces_snapshot(case_id):
    name, kwargs, causal = CASES[case_id]
    saved = SNAPSHOT[case_id]
    attn = record.build(name, kwargs, causal)
    state = {renamed(k, name): t for k, t in saved["state_dict"].items()}
    attn.load_state_dict(state, strict=True)
    got = record.compute(attn, name, causal)
    expected = saved["result"]
    if "out_train" in expected and "out_train" not in got:
        # recorded only when it differs from eval's output: now it does not (dma's train and
        # eval paths became one), so the recorded training output must equal that one
        got["out_train"] = got["out_masked"]
    if "out_train" in got and "out_train" not in expected:
        # recorded where training and eval outputs were bit-equal (moh: dense rows in
        # training, packed rows in eval); another CPU's summation order (avx2, one thread)
        # can make them differ by rounding: the training output must equal the recording
        train = got.pop("out_train")
        scale = max(1.0, train.detach().abs().max().item())
        torch.testing.assert_close(train, expected["out_masked"], atol=RTOL * scale, rtol=RTOL,
                                   msg=lambda m: f"{case_id} out_train: {m}")
    old_names = {renamed(k, name): k for k in expected}
    assert sorted(old_names) == sorted(got), "a different set of observables"
    for key, value in got.items():
        want = expected[old_names[key]]
        assert value.dtype == want.dtype == torch.float64 or not value.is_floating_point(), (
            f"{case_id} {key}: the snapshot compares float64 results, got {value.dtype}")
        scale = max(1.0, value.detach().abs().max().item()) if value.numel() else 1.0
        atol = RTOL * scale
        if record.projected(key):
            # a projection sums n elements times N(0, 1) weights: n errors of at most atol
            # move it by at most atol * sqrt(n) in the typical case (random signs)
            atol *= math.sqrt(int(saved["sizes"][old_names[key]]))
            value = record.project(value)
        torch.testing.assert_close(value, want, atol=atol, rtol=RTOL,
                                   msg=lambda m, key=key: f"{case_id} {key}: {m}")
