"""Every public op takes the same keyword arguments: ``backend=`` (with ``"reference"``)
included, and an unknown keyword is rejected with the op's own name, never an internal
helper's."""

from __future__ import annotations

import pytest
import torch

from attnlab import ops
from attnlab.ops.decode import BACKENDS as DECODE_BACKENDS

from ..tolerances import assert_close

# every op that computes an attention output, with the options it needs
OPS = {
    "decode_attention": {},
    "linear_attention": {},
    "local_linear_attention": {},
    "neighborhood_attention": {"kernel_size": 3},
    "random_feature_attention": {},
    "sigmoid_attention": {},
    "softmax_attention": {},
    "softplus_attention": {},
}


def _qkv(lq: int = 5, lk: int = 5, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, lq, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2 if lq != lk else 4, lk, 8, generator=g, dtype=dtype)
            for _ in range(2))
    return q, k, v


def test_the_list_covers_every_public_op():
    public = {n for n in ops.__all__ if n.endswith("_attention")}
    assert public == set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_takes_backend_reference(name):
    op = getattr(ops, name)
    q, k, v = _qkv()
    out = op(q, k, v, backend="reference", **OPS[name])
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert_close(op(q, k, v, **OPS[name]), out)  # auto: the same math


@pytest.mark.parametrize("name", sorted(OPS))
def test_an_unknown_keyword_names_the_op(name):
    op = getattr(ops, name)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=rf"^{name}\(\).*'no_such_option'"):
        op(q, k, v, no_such_option=1, **OPS[name])


@pytest.mark.parametrize("name", sorted(OPS))
def test_an_unknown_backend_names_the_op_and_the_choices(name):
    op = getattr(ops, name)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"{name}.*'no_such_backend'.*reference"):
        op(q, k, v, backend="no_such_backend", **OPS[name])


@pytest.mark.parametrize("backend", ["auto", *DECODE_BACKENDS])
@pytest.mark.parametrize("causal", [False, True])
def test_decode_backends_equal_the_float64_reference(backend, causal):
    q, k, v = _qkv(lq=3, lk=37)
    keep = torch.rand(2, 1, 1, 37, generator=torch.Generator().manual_seed(1)) > 0.3
    ref = ops.softmax_attention(q.double(), k.double(), v.double(), causal=causal, mask=keep,
                                backend="reference")
    out = ops.decode_attention(q, k, v, causal=causal, mask=keep, backend=backend)
    assert out.dtype == q.dtype
    assert_close(out, ref)
    out64 = ops.decode_attention(q.double(), k.double(), v.double(), causal=causal, mask=keep,
                                 backend=backend)
    assert_close(out64, ref)


def test_decode_splits_apply_to_the_split_backend_only():
    q, k, v = _qkv(lq=1, lk=20)
    ref = ops.decode_attention(q, k, v, backend="reference")
    assert_close(ops.decode_attention(q, k, v, splits=3, backend="split"), ref)
    assert_close(ops.decode_attention(q, k, v, splits=3), ref)  # auto with splits: split
    for backend in ("fused", "reference"):
        with pytest.raises(ValueError, match="splits=3 applies to the 'split' backend"):
            ops.decode_attention(q, k, v, splits=3, backend=backend)
    with pytest.raises(ValueError, match="splits must be an int >= 1"):
        ops.decode_attention(q, k, v, splits=0)
