"""Backend choice and input checks of the ops."""

import pytest
import torch

from attnlab.ops import sigmoid_attention, softmax_attention, softplus_attention

from .cases import make_qkv


def test_auto_picks_sdpa_for_softmax_and_tiled_for_others_on_cpu(monkeypatch):
    import attnlab.ops.sigmoid as sig
    import attnlab.ops.softmax as sm

    calls = []
    monkeypatch.setattr(sig, "row_tiled", lambda *a, **k: calls.append("tiled") or a[3])
    monkeypatch.setattr(sm, "_sdpa", lambda *a, **k: calls.append("sdpa") or a[0])
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    sigmoid_attention(q, k, v)
    softmax_attention(q, k, v)
    assert calls == ["tiled", "sdpa"]


def test_unknown_backend_is_a_value_error_listing_choices():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'nope'.*tiled"):
        sigmoid_attention(q, k, v, backend="nope")


def test_flex_refuses_training_on_cpu():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="no backward on CPU"):
        softplus_attention(q, k, v, backend="flex")


def test_tensor_bias_falls_back_to_reference_and_is_refused_by_tiled():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 8, torch.float64, requires_grad=False)
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    out = sigmoid_attention(q, k, v, bias=bias)
    s = torch.sigmoid(q @ k.mT / 8 ** 0.5 + bias)
    torch.testing.assert_close(out, s @ v)
    with pytest.raises(ValueError, match="float bias only"):
        sigmoid_attention(q, k, v, bias=bias, backend="tiled")


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[0], k, v), "4-D"),
    (lambda q, k, v: (q, k[..., :4], v), "head dims differ"),
    (lambda q, k, v: (q, k[:, :, :3], v), "do not line up"),
    (lambda q, k, v: (q, k.double(), v), "dtypes differ"),
])
def test_op_input_errors(bad, match):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        softmax_attention(*bad(q, k, v))


def test_op_mask_errors():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="bool"):
        sigmoid_attention(q, k, v, mask=torch.ones(1, 1, 1, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        sigmoid_attention(q, k, v, mask=torch.ones(1, 1, 1, 5, dtype=torch.bool))


def test_gqa_query_head_h_uses_kv_head_h_div_group():
    """Built head by head, without the ops' own expansion: query heads 0-2 share kv head 0,
    3-5 kv head 1 (a .repeat instead of .repeat_interleave would pair them differently)."""
    q, k, v = make_qkv(2, 6, 2, 7, 7, 8, torch.float64, requires_grad=False)
    for op in (softmax_attention, sigmoid_attention, softplus_attention):
        grouped = op(q, k, v, causal=True)
        per_head = torch.cat([op(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], v[:, h // 3:h // 3 + 1],
                                 causal=True) for h in range(6)], dim=1)
        torch.testing.assert_close(grouped, per_head)


def test_explain_gives_the_reason_for_each_skipped_backend_on_cpu():
    from attnlab.ops.dispatch import explain
    from attnlab.ops.sigmoid import BACKENDS

    q, k, v = make_qkv(1, 2, 2, 4, 4, 32, torch.float32)
    verdicts = dict(explain("sigmoid_attention", "auto", BACKENDS, q, k, v))
    assert verdicts["flex"].startswith("skipped: auto uses FlexAttention on CUDA only")
    assert verdicts["tiled"] == "chosen" and verdicts["reference"] == "not tried"
    verdicts = dict(explain("sigmoid_attention", "auto", BACKENDS, q, k, v, tensor_bias=True))
    assert "float bias only" in verdicts["tiled"] and verdicts["reference"] == "chosen"


class _FakeCuda:
    """Stands in for a CUDA tensor in the dispatcher's checks (shape, device, grad)."""

    def __init__(self, *shape, requires_grad=False):
        self.shape, self.requires_grad = torch.Size(shape), requires_grad
        self.device = torch.device("cuda")


@pytest.mark.parametrize("head_dim, reason", [(8, "head dims >= 16"), (64, None)])
def test_auto_takes_flex_on_cuda_only_for_head_dims_it_compiles(head_dim, reason):
    from attnlab.ops.dispatch import Request, why_not

    t = _FakeCuda(1, 2, 9, head_dim, requires_grad=True)
    got = why_not("flex", Request("sigmoid_attention", t, t, t), auto=True)
    assert (got is None) if reason is None else (reason in got)


def test_softmax_auto_prefers_sdpa_over_flex_everywhere():
    from attnlab.ops.dispatch import Request, why_not
    from attnlab.ops.softmax import BACKENDS

    t = _FakeCuda(1, 2, 9, 64)
    assert BACKENDS[0] == "sdpa" and why_not("sdpa", Request("softmax", t, t, t), auto=True) \
        is None


def test_recorded_collects_the_choices_of_a_module_call_and_logs_them(caplog):
    import logging

    import attnlab as al
    from attnlab.ops.dispatch import recorded

    attn = al.build("softplus", dim=32, heads=2)
    with caplog.at_level(logging.DEBUG, logger="attnlab.ops"), recorded() as choices:
        attn(torch.randn(1, 5, 32))
    assert [op for op, _ in choices] == ["softplus_attention"]
    assert ("tiled", "chosen") in choices[0][1]
    assert any("softplus_attention: tiled" in r.getMessage() for r in caplog.records)
