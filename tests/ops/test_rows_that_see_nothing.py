"""One rule for every op and backend: a query row that sees no key outputs 0, never NaN, and
what a masked key holds (a NaN bias included) never reaches an output (issue 41)."""

import pytest
import torch

from attnlab import ops
from attnlab.ops import linear_attention, softmax_attention

from ..tolerances import assert_close


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 5, 8, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_a_row_whose_bias_is_minus_inf_everywhere_is_zero(backend):
    q, k, v = qkv()
    bias = torch.zeros(2, 2, 5, 5)
    bias[:, :, 1] = float("-inf")  # row 1 sees nothing
    bias[:, :, 3, :2] = float("-inf")  # row 3 sees keys 2-4 only
    out = softmax_attention(q, k, v, bias=bias, backend=backend)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 3, :2] = False
    expected = softmax_attention(q, k, v, mask=mask, backend="reference")
    assert_close(out[:, :, 3], expected[:, :, 3])
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_a_float_bias_of_minus_inf_hides_every_key(backend):
    q, k, v = (t.detach() for t in qkv())
    out = softmax_attention(q, k, v, bias=float("-inf"), backend=backend)
    assert (out == 0).all()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_a_nan_bias_at_a_masked_key_never_reaches_an_output(backend):
    q, k, v = qkv()
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 4] = False
    bias = torch.randn(2, 2, 5, 5)
    poisoned = bias.clone()
    poisoned[..., 4] = float("nan")
    out = softmax_attention(q, k, v, bias=poisoned, mask=mask, backend=backend)
    assert_close(out, softmax_attention(q, k, v, bias=bias, mask=mask, backend="reference"))


@pytest.mark.parametrize("backend", ["parallel", "chunked", "recurrent"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_linear_attention_rows_without_keys_are_zero_even_with_eps_zero(backend, eps):
    q, k, v = qkv()
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[1] = False  # sequence 1 has no key at all
    out = linear_attention(q, k, v, mask=keep, eps=eps, backend=backend)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert_close(out[0], linear_attention(q[:1], k[:1], v[:1], backend="parallel")[0])


WEIGHT_FUNCTIONS = sorted(n for n in dir(ops) if n.endswith("_weights"))


@pytest.mark.parametrize("name", WEIGHT_FUNCTIONS)
def test_weight_functions_keep_a_nan_key_to_the_rows_that_see_it(name):
    """Issue 41: ``lla_weights`` made every weight NaN for a NaN key that was masked or in
    the causal future (0 x NaN in its key mean and covariance)."""
    weights = getattr(ops, name)
    q, k = (t.detach() for t in qkv()[:2])
    poisoned = k.clone()
    poisoned[:, :, 4] = float("nan")
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    mask[..., 4] = False
    assert_close(weights(q, poisoned, mask=mask), weights(q, k, mask=mask))
    causal = weights(q, poisoned, causal=True)
    assert_close(causal[:, :, :4], weights(q, k, causal=True)[:, :, :4])
    assert causal[:, :, 4, 4].isnan().all()  # the row that sees it (its other weights
    # are NaN too where the weights are normalised over the keys)
