"""Every mechanism reproduces the recorded behaviour snapshot (see record.py) to 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from . import record

SNAPSHOT = record.load()
CASES = {case_id: (name, kwargs, causal) for case_id, name, kwargs, causal in record.cases()}
TOL = 1e-6

# parameter and buffer names that a refactoring renamed: old name -> new name
RENAMES: dict[str, str] = {}


def renamed(key: str) -> str:
    """A recorded parameter name (or ``grad.<name>``) as the current code spells it."""
    for old, new in RENAMES.items():
        for prefix in ("", "grad."):
            if key.startswith(prefix + old):
                return prefix + new + key[len(prefix + old):]
    return key


def test_snapshot_covers_every_case():
    assert sorted(SNAPSHOT) == sorted(CASES)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_mechanism_reproduces_snapshot(case_id):
    name, kwargs, causal = CASES[case_id]
    saved = SNAPSHOT[case_id]
    attn = record.build(name, kwargs, causal)
    attn.load_state_dict({renamed(k): t for k, t in saved["state_dict"].items()}, strict=True)
    got = record.compute(attn, name, causal)
    expected = saved["result"]
    old_names = {renamed(k): k for k in expected}
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
