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


# the PyTorch backends; the triton kernel has its own tests (tests/triton/test_decode.py)
@pytest.mark.parametrize("backend", ["auto", *(b for b in DECODE_BACKENDS if b != "triton")])
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


def _t(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype) if not dtype.is_floating_point else \
        torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


BAD_OP_INPUTS = [  # issue 41: each failed inside torch or Python, or was accepted
    ("int q, k, v", lambda: ops.softmax_attention(*(_t(1, 2, 3, 4, dtype=torch.int64),) * 3),
     "must be floating point, got torch.int64"),
    ("bool q, k, v", lambda: ops.sigmoid_attention(*(_t(1, 2, 3, 4, dtype=torch.bool),) * 3),
     "must be floating point, got torch.bool"),
    ("no key head", lambda: ops.softmax_attention(_t(1, 2, 3, 4), _t(1, 0, 3, 4),
                                                  _t(1, 0, 3, 4)),
     "need at least one head, got 2 query and 0 key heads"),
    ("head dim 0", lambda: ops.softmax_attention(_t(1, 2, 3, 0), _t(1, 2, 3, 0),
                                                 _t(1, 2, 3, 4)),
     "head dim 0: there is no default scale"),
    ("bias shape", lambda: ops.softmax_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                                 bias=_t(5, 7)),
     r"tensor bias must be floating point and broadcast to \(B, H, Lq, Lk\) = \(1, 2, 3, 3\)"),
    ("bias nan", lambda: ops.sigmoid_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                               bias=float("nan")),
     "bias must be a number below inf .not NaN."),
    ("bias inf", lambda: ops.softmax_attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                               bias=float("inf")),  # all-NaN output before
     "bias must be a number below inf"),

    ("weights bias shape", lambda: ops.softmax_weights(_t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                                       bias=_t(2, 2, 3, 3)),
     "softmax_weights: a tensor bias"),
    ("scale nan", lambda: ops.softmax_attention(*(_t(1, 2, 3, 4),) * 3, scale=float("nan")),
     "scale must be a finite number or None, got nan"),
    ("eps -1", lambda: ops.linear_attention(*(_t(1, 2, 3, 4),) * 3, eps=-1.0),
     "eps must be a finite number >= 0, got -1.0"),
    ("chunk_size 2.5", lambda: ops.linear_attention(*(_t(1, 2, 3, 4),) * 3, causal=True,
                                                    chunk_size=2.5),
     "chunk_size must be an int >= 1, got 2.5"),
    ("mask as a list", lambda: ops.softmax_attention(*(_t(1, 2, 3, 4),) * 3, mask=[True]),
     "mask must be a bool tensor .True = may attend., got list"),
    # a state of another batch size or head count broadcast silently; ints failed in torch
    ("state of batch 1 for batch 2", lambda: ops.linear_attention(
        *(_t(2, 2, 3, 4),) * 3, causal=True,
        state=ops.linear_attention(*(_t(1, 2, 3, 4),) * 3, causal=True, return_state=True)[1]),
     r"state must be \(S, z\) with S \(2, 2, 4, 4\) and z \(2, 2, 4\).*got \(\(1, 2, 4, 4\)"),
    ("state of ints", lambda: ops.linear_attention(*(_t(1, 2, 3, 4),) * 3, causal=True,
                                                   state=(1, 2)),
     r"state must be \(S, z\).*got \('int', 'int'\)"),
]


@pytest.mark.parametrize("what, call, match", BAD_OP_INPUTS, ids=[b[0] for b in BAD_OP_INPUTS])
def test_bad_op_inputs_are_value_errors_that_say_what_was_expected(what, call, match):
    with pytest.raises(ValueError, match=match):
        call()
