"""Every public op, every way a call can be malformed (issue 41): each generated invalid call
raises ValueError or TypeError from attnlab's own code, with a message that names the op —
never an exception from inside torch or Python, never a silent result.

The cases are the product of the ops (the attention ops of ``OPS``, the weights functions of
``WEIGHTS``) and the mutations below, and of every keyword option of every public op and
values its annotation excludes; ``test_every_public_op_is_swept`` fails for a new op until it
is added.
"""

from __future__ import annotations

import inspect
import traceback
from pathlib import Path

import pytest
import torch

from attnlab import ops

from .test_op_arguments import OPS

WEIGHTS = {"lla_weights": {}, "random_feature_weights": {}, "sigmoid_weights": {},
           "softmax_weights": {}, "softplus_weights": {}}
ATTNLAB = Path(ops.__file__).resolve().parents[1]


def _valid(lq: int = 5):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, lq, 8, generator=g)
    k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(2))
    return q, k, v


def _mutations():
    """name -> function (q, k, v, kwargs) -> (q, k, v, kwargs) of an invalid call."""
    def with_kw(**kw):
        return lambda q, k, v, o: (q, k, v, {**o, **kw})
    return {
        "q as a list": lambda q, k, v, o: (q.tolist(), k, v, o),
        "int64 q, k, v": lambda q, k, v, o: (q.long(), k.long(), v.long(), o),
        "complex q, k, v": lambda q, k, v, o: (q.cfloat(), k.cfloat(), v.cfloat(), o),
        "q float64, k float32": lambda q, k, v, o: (q.double(), k, v, o),
        "3-d q": lambda q, k, v, o: (q[0], k, v, o),
        "5-d k": lambda q, k, v, o: (q, k[None], v, o),
        "batch 2 vs 1": lambda q, k, v, o: (q, k[:1], v[:1], o),
        "4 query heads over 3 kv heads": lambda q, k, v, o: (
            q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), o),
        "q head dim 8, k head dim 6": lambda q, k, v, o: (q, k[..., :6], v, o),
        "k length 5, v length 4": lambda q, k, v, o: (q, k, v[:, :, :4], o),
        "mask of floats": with_kw(mask=torch.ones(2, 5)),
        "mask of the wrong length": with_kw(mask=torch.ones(2, 4, dtype=torch.bool)),
        "mask of the wrong batch": with_kw(mask=torch.ones(3, 5, dtype=torch.bool)),
        "causal='yes'": with_kw(causal="yes"),
        "backend=3": with_kw(backend=3),
    }


MUTATIONS = _mutations()
NO_VALUES = {"k length 5, v length 4"}  # a weights function takes no v
CASES = [(op, m) for op in sorted(OPS) for m in MUTATIONS] + [
    (op, m) for op in sorted(WEIGHTS) for m in MUTATIONS if m not in NO_VALUES]


def test_every_public_op_is_swept():
    assert set(ops.__all__) == set(OPS) | set(WEIGHTS) | {"neighborhood_visibility"}


def _call(op_name: str, q, k, v, kwargs: dict):
    op = getattr(ops, op_name)
    if op_name in WEIGHTS:
        return op(q, k, **kwargs)
    if op_name == "neighborhood_visibility":
        return op((5,), **kwargs)
    return op(q, k, v, **kwargs)


def _defaults(op_name: str) -> dict:
    if op_name == "neighborhood_visibility":
        return {"kernel_size": 3}
    return dict(OPS.get(op_name, WEIGHTS.get(op_name, {})))


def _raised_in_attnlab(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return Path(frames[-1].filename).resolve().is_relative_to(ATTNLAB)


@pytest.mark.parametrize("op_name, mutation", CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_an_invalid_op_call_is_refused_by_attnlab_naming_the_op(op_name, mutation):
    kwargs = _defaults(op_name)
    if op_name == "neighborhood_attention":
        q, k, v = (t[:, :2] for t in _valid())  # its keys are its queries: same length
    else:
        q, k, v = _valid()
    q, k, v, kwargs = MUTATIONS[mutation](q, k, v, kwargs)
    with pytest.raises((ValueError, TypeError)) as caught:
        _call(op_name, q, k, v, kwargs)
    assert _raised_in_attnlab(caught.value), (
        f"raised from {traceback.extract_tb(caught.value.__traceback__)[-1].filename}: "
        f"{caught.value!r}")
    assert op_name in str(caught.value), f"the message does not name {op_name}: {caught.value}"


def _invalid_values(annotation: object) -> list:
    """Values no option of this annotation accepts (bool options: not bools; ints: negative,
    fractional, text; floats: NaN, text; strings: an unknown name)."""
    text = str(annotation)
    if text == "bool":
        return ["yes", 1.0]
    if "str" in text:
        return ["no_such_choice", 3.5]
    if "int" in text or annotation is inspect.Parameter.empty:  # sizes, kernels, splits
        return [-1, 2.5, "3"]
    if "float" in text:
        return [float("nan"), "x"]
    return []


SKIPPED_OPTIONS = {"mask", "backend", "causal", "state", "bias"}  # covered above / elsewhere
OPTION_CASES = [
    (op, p.name, value)
    for op in sorted(ops.__all__)
    for p in inspect.signature(getattr(ops, op)).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in SKIPPED_OPTIONS
    for value in _invalid_values(p.annotation)
]


@pytest.mark.parametrize("op_name, option, value", OPTION_CASES,
                         ids=[f"{o}-{n}={v!r}" for o, n, v in OPTION_CASES])
def test_an_invalid_op_option_is_refused_naming_the_op_and_the_option(op_name, option, value):
    kwargs = {**_defaults(op_name), option: value}
    if op_name == "neighborhood_attention":
        q, k, v = (t[:, :2] for t in _valid())
    else:
        q, k, v = _valid()
    with pytest.raises((ValueError, TypeError)) as caught:
        _call(op_name, q, k, v, kwargs)
    where = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert _raised_in_attnlab(caught.value), f"raised at {where.filename}:{where.lineno}: " \
                                             f"{caught.value!r}"
    message = str(caught.value)
    assert op_name in message and option in message, message
