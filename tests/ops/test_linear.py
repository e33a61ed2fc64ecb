"""linear_attention: the parallel, chunked and recurrent forms agree, forward and backward."""

import pytest
import torch

from attnlab.ops.dispatch import recorded
from attnlab.ops.linear import FEATURE_MAPS, linear_attention, prefix_sums

from ..tolerances import assert_close
from .cases import key_padding


def qkv(lq, lk=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    shapes = ((2, 4, lq, 8), (2, 2, lk, 8), (2, 2, lk, 6))
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def run(q, k, v, grad, **kw):
    out = linear_attention(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("length", [1, 63, 257])
@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_three_forms_agree_forward_and_backward(length, feature_map, causal, normalize):
    q, k, v = qkv(length)
    if feature_map == "identity" and normalize:
        # identity features give signed denominators; keep them away from 0 for a fair check
        q, k = (t.detach().abs().add(0.5).requires_grad_() for t in (q, k))
    grad = torch.randn(2, 4, length, 6)
    kw = dict(causal=causal, feature_map=feature_map, normalize=normalize)
    ref = run(q, k, v, grad, backend="parallel", **kw)
    # float64: the forms are the same function
    ref64 = run(*(t.detach().double().requires_grad_() for t in (q, k, v)), grad.double(),
                backend="parallel", **kw)
    for form, chunk in (("chunked", 16), ("chunked", 64), ("recurrent", 1)):
        got = run(q, k, v, grad, backend=form, chunk_size=chunk, **kw)
        for a, b in zip(got, ref, strict=True):
            # fp32: 2e-5 of the tensor's scale. Unnormalised sums reach the hundreds and the
            # forms add the same terms in different orders; normalised relu rows with a small
            # denominator amplify that rounding (worst seen: 1.1e-5 of scale, relu, L = 257).
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, atol=2e-5 * max(scale, 1.0), rtol=1e-5)
        got64 = run(*(t.detach().double().requires_grad_() for t in (q, k, v)), grad.double(),
                    backend=form, chunk_size=chunk, **kw)
        for a, b in zip(got64, ref64, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10 * max(b.abs().max().item(), 1.0),
                                       rtol=1e-10)


@pytest.mark.parametrize("form", ["parallel", "chunked", "recurrent"])
def test_key_padding_is_the_same_in_every_form(form):
    q, k, v = qkv(37)
    mask = key_padding(2, 37)
    ref = linear_attention(q, k, v, causal=True, mask=mask, backend="parallel")
    got = linear_attention(q, k, v, causal=True, mask=mask, backend=form, chunk_size=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # padded keys change nothing
    k2 = torch.where(mask[:, :, 0, :, None].expand(2, 2, 37, 1), k, 9 * torch.randn_like(k))
    torch.testing.assert_close(linear_attention(q, k2, v, causal=True, mask=mask, backend=form),
                               ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form, chunk", [("parallel", 64), ("chunked", 64), ("chunked", 8),
                                         ("recurrent", 64)])
def test_prefill_in_pieces_with_a_state_equals_one_pass(form, chunk):
    """Pieces of one and of several chunks (chunk 8: the state sums every chunk's keys)."""
    q, k, v = qkv(50)
    full = linear_attention(q, k, v, causal=True, backend=form)
    state, outs = None, []
    for a, b in ((0, 13), (13, 14), (14, 41), (41, 50)):
        out, state = linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True,
                                      backend=form, state=state, return_state=True,
                                      chunk_size=chunk)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=1e-5)
    s, z = state
    assert s.shape == (2, 4, 8, 6) and z.shape == (2, 4, 8)  # fixed size, whatever the length


def test_bidirectional_equals_dense_normalised_product():
    q, k, v = (t.detach().double() for t in qkv(20))
    phi = FEATURE_MAPS["elu"]
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    a = phi(q) @ phi(k).mT
    expected = (a / a.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(linear_attention(q, k, v), expected)


def test_prefix_sums_match_their_definition():
    q, k, v = (t.detach().double() for t in qkv(12))
    fq, fk = q.exp(), k.exp()
    a, d, vs, n, _ = prefix_sums(fq, fk, v, causal=True, mask=None)
    fk2, v2 = fk.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    tril = torch.ones(12, 12, dtype=torch.bool).tril()
    scores = (fq @ fk2.mT).masked_fill(~tril, 0)
    torch.testing.assert_close(a, scores @ v2)
    torch.testing.assert_close(d, scores.sum(-1))
    torch.testing.assert_close(vs, v2.cumsum(2))
    torch.testing.assert_close(n, torch.arange(1, 13.0).expand(2, 4, 12).double())


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "fast"}, "unknown backend 'fast'"),
    ({"feature_map": "cosine"}, "unknown feature_map"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"return_state": True}, "pass causal=True"),
])
def test_errors(kwargs, match):
    q, k, v = qkv(5)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="chunked form takes a key padding mask"):
        linear_attention(q, k, v, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool),
                         backend="chunked")


def test_auto_takes_the_parallel_form_where_only_it_can_serve():
    q, k, v = qkv(5)
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    with recorded() as choices:
        out = linear_attention(q, k, v, mask=tril)
    assert "key padding" in dict(choices[-1][1])["chunked"]
    assert ("parallel", "chosen") in choices[-1][1]
    torch.testing.assert_close(out, linear_attention(q, k, v, causal=True))
    few = linear_attention(q[:, :, 3:], k, v, causal=True)  # 2 queries over 5 keys, no state
    torch.testing.assert_close(few, linear_attention(q, k, v, causal=True)[:, :, 3:])


@pytest.mark.parametrize("causal", [True, False])
def test_auto_takes_the_parallel_form_when_the_keys_fit_in_one_chunk(causal):
    q, k, v = qkv(9)
    for chunk, form in ((9, "parallel"), (8, "chunked")):
        with recorded() as choices:
            out = linear_attention(q, k, v, causal=causal, chunk_size=chunk)
        assert (form, "chosen") in choices[-1][1]
        if form == "parallel":
            assert "fit in one chunk (9 <= chunk_size 9)" in dict(choices[-1][1])["chunked"]
        assert_close(out, linear_attention(q, k, v, causal=causal, backend="chunked",
                                           chunk_size=chunk))


class AllocatedElements:
    """Counts every element the dispatched ops produce (a deterministic cost measure)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        outer.total += t.numel()
                return out

        self.total, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_training_work_grows_linearly_with_length(form):
    """Doubling L must about double what forward + backward allocate (a slice per chunk in
    the backward once made it quadratic: 11 s instead of 0.35 s at L = 16384)."""
    totals = []
    for length in (256, 512):
        q, k, v = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(3))
        with AllocatedElements() as probe:
            linear_attention(q, k, v, causal=True, backend=form, chunk_size=16).sum().backward()
        totals.append(probe.total)
    assert totals[1] / totals[0] < 2.3, totals
