"""Every registered mechanism, every way a forward call can be malformed (issue 41): each
generated invalid call raises ValueError or TypeError from attnlab's own code, with a message
that names the mechanism — never an exception from inside torch or Python, never a silent
result. A new mechanism is covered without writing a test for it."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

import attnlab as al

ATTNLAB = Path(al.__file__).resolve().parent
DIM, HEADS = 16, 2


def _inputs(name: str):
    info = al.info(name)
    if "seq" in info.domains:
        return torch.randn(2, 9, DIM), {}
    return torch.randn(2, 3, 3, DIM), {}


def _mutations():
    """name -> function (x, kwargs, module) -> (x, kwargs) of an invalid call."""
    def kw(**extra):
        return lambda x, o, m: (x, {**o, **extra})
    b = 2
    return {
        "x as a list": lambda x, o, m: (x.tolist(), o),
        "int64 x": lambda x, o, m: (x.long(), o),
        "complex x": lambda x, o, m: (x.cfloat(), o),
        "x with 0 channels": lambda x, o, m: (x[..., :0], o),
        "x float64, module float32": lambda x, o, m: (x.double(), o),
        "2-d x": lambda x, o, m: (x.reshape(-1, DIM), o),
        "6-d x": lambda x, o, m: (x.reshape(b, 1, 1, 1, -1, DIM), o),
        "x with 15 channels": lambda x, o, m: (x[..., :15], o),
        "mask of floats": lambda x, o, m: (x, {**o, "mask": torch.ones(x.shape[:-1])}),
        "mask as a list": lambda x, o, m: (x, {**o, "mask": [[True] * x.shape[1]] * b}),
        "mask of the wrong length": lambda x, o, m: (
            x, {**o, "mask": torch.ones(b, 4, dtype=torch.bool)}),
        "mask of the wrong batch": lambda x, o, m: (
            x, {**o, "mask": torch.ones(3, *x.shape[1:-1], dtype=torch.bool)}),
        "mask as a 0-d tensor": kw(mask=torch.tensor(True)),
        "state not from new_state": kw(state={"k": torch.zeros(1)}),
        "state=5": kw(state=5),
        "context with 15 channels": kw(context=torch.randn(2, 4, 15)),
        "context_mask without context": kw(context_mask=torch.ones(2, 4, dtype=torch.bool)),
        "spatial that does not match": lambda x, o, m: (
            x.reshape(b, -1, DIM), {**o, "spatial": (2, 5)}),
    }


MUTATIONS = _mutations()
CASES = [(n, m) for n in al.available() for m in MUTATIONS]


def _raised_in_attnlab(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return Path(frames[-1].filename).resolve().is_relative_to(ATTNLAB)


@pytest.mark.parametrize("name, mutation", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_an_invalid_forward_is_refused_by_attnlab_naming_the_mechanism(name, mutation):
    torch.manual_seed(0)
    module = al.build(name, dim=DIM, heads=HEADS)
    x, kwargs = _inputs(name)
    x, kwargs = MUTATIONS[mutation](x, kwargs, module)
    with pytest.raises((ValueError, TypeError)) as caught:
        module(x, **kwargs)
    where = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert _raised_in_attnlab(caught.value), f"raised at {where.filename}:{where.lineno}: " \
                                             f"{caught.value!r}"
    assert name in str(caught.value), f"the message does not name {name}: {caught.value}"
