"""Every mechanism reproduces the recorded behaviour snapshot (see record.py) to 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from . import record

SNAPSHOT = record.load()
CASES = {case_id: (name, kwargs, causal) for case_id, name, kwargs, causal in record.cases()}
TOL = 1e-6

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
    old_names = {renamed(k, name): k for k in expected}
    assert sorted(old_names) == sorted(got), "a different set of observables"
    for key, value in got.items():
        want = expected[old_names[key]]
        if record.projected(key):
            n = int(saved["sizes"][old_names[key]])
            value = record.project(value)
            atol = TOL * math.sqrt(n)  # n errors of at most 1e-6 move a projection this much
            torch.testing.assert_close(value, want, atol=atol, rtol=TOL,
                                       msg=lambda m, key=key: f"{case_id} {key}: {m}")
        else:
            torch.testing.assert_close(value, want, atol=TOL, rtol=TOL,
                                       msg=lambda m, key=key: f"{case_id} {key}: {m}")
