"""Base-class behaviour shared by all mechanisms: arguments, hooks, positions, states."""

import pytest
import torch

import attnlab as al
from attnlab.modules.rotary import Rotary


@pytest.mark.parametrize("kwargs, match", [
    ({"kv_heads": 3}, "must divide heads"),
    ({"gate": "channel"}, "gate must be one of"),
    ({"backend": "cuda-magic"}, "unknown backend"),
    ({"dropout": 1.0}, "dropout"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        al.build("softmax", dim=32, heads=4, **kwargs)


BAD_COMMON_ARGUMENTS = [  # issue 41: each was accepted, or failed inside torch or Python
    ({"causal": "false"}, r"causal must be True, False or None, got 'false' \(str\)"),
    ({"head_dim": 0}, r"head_dim must be an int >= 1 or None, got 0"),
    ({"head_dim": 8.0}, r"head_dim must be an int >= 1 or None, got 8.0 \(float\)"),
    ({"kv_heads": "2"}, r"kv_heads must be an int >= 1 or None, got '2'"),
    ({"heads": True}, r"heads must be an int >= 1, got True \(bool\)"),
    ({"dropout": None}, r"dropout must be a finite number >= 0 and < 1, got None"),
    ({"dropout": "0.1"}, r"dropout must be .*, got '0.1'"),
    ({"rope_base": 0}, r"rope_base must be a finite number > 0, got 0"),
    ({"rope_base": float("nan")}, r"rope_base must be a finite number > 0, got nan"),
    ({"bias": "no"}, r"bias must be True or False, got 'no'"),
    ({"rope": "yes"}, r"rope must be True or False, got 'yes'"),
    ({"qk_norm": "yes"}, r"qk_norm must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("kwargs, match", BAD_COMMON_ARGUMENTS)
def test_common_arguments_are_checked_with_their_name_and_range(kwargs, match):
    args = {"dim": 32, "heads": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        al.build("softmax", **args)
    with pytest.raises(TypeError, match=match):  # an ArgumentError is both
        al.build("softmax", **args)


@pytest.mark.parametrize("name", al.available())
def test_every_mechanism_refuses_a_causal_string(name):
    """causal='false' is a true string: it built a causal module."""
    with pytest.raises(ValueError, match=f"{name}: causal must be True, False or None"):
        al.build(name, dim=32, heads=4, causal="false")


def test_context_of_another_dtype_and_negative_spatial_sizes_are_named():
    """Issue 41: a float64 context failed inside torch ("expected m1 and m2 to have the same
    dtype") and spatial=(-3, -3) was taken for a 9-token input."""
    attn = al.build("softmax", dim=16, heads=2)
    x = torch.randn(1, 9, 16)
    with pytest.raises(ValueError, match="context is torch.float64 on cpu, x is torch.float32"):
        attn(x, context=torch.randn(1, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"spatial must be .* of ints >= 1, got \(-3, -3\)"):
        attn(x, spatial=(-3, -3))
    assert attn(x, spatial=(3, 3)).shape == x.shape


def test_dim_not_divisible_needs_head_dim():
    with pytest.raises(ValueError, match="pass head_dim"):
        al.build("softmax", dim=30, heads=4)
    attn = al.build("softmax", dim=30, heads=4, head_dim=8)
    assert attn(torch.randn(1, 3, 30)).shape == (1, 3, 30)


def test_gqa_projection_sizes():
    attn = al.build("softmax", dim=32, heads=4, kv_heads=1)
    assert attn.qkv.k.out_features == attn.qkv.v.out_features == 8
    assert attn.qkv.q.out_features == 32


def test_gqa_equals_mha_with_repeated_kv_projections():
    torch.manual_seed(0)
    gqa = al.build("softmax", dim=32, heads=4, kv_heads=2, causal=True)
    mha = al.build("softmax", dim=32, heads=4, causal=True)
    with torch.no_grad():
        mha.qkv.q.weight.copy_(gqa.qkv.q.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k", "v"):
            w = getattr(gqa.qkv, name).weight.unflatten(0, (2, 8)).repeat_interleave(2, 0)
            getattr(mha.qkv, name).weight.copy_(w.flatten(0, 1))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(gqa(x), mha(x))


def test_rope_scores_depend_only_on_relative_position():
    rot = Rotary(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(i, j):
        return (rot(q, torch.tensor([i])) * rot(k, torch.tensor([j]))).sum()
    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_hook_weights_is_not_computed_unless_hooked(monkeypatch):
    attn = al.build("softmax", dim=16, heads=2)
    def boom(*a, **k):
        raise AssertionError("weights materialised without a hook")
    monkeypatch.setattr(attn, "attention_weights", boom)
    attn(torch.randn(1, 4, 16))  # no hook: fine
    attn.hook_weights.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(AssertionError, match="materialised"):
        attn(torch.randn(1, 4, 16))


def test_hook_weights_refuses_a_recurrent_state_and_says_what_to_do():
    """A linear mechanism's state keeps a summary of the keys, not the keys: no weights."""
    attn = al.build("linear", dim=16, heads=2, causal=True)
    attn.hook_weights.register_forward_hook(lambda m, i, o: None)
    attn(torch.randn(1, 4, 16))  # without a state: fine
    with pytest.raises(ValueError, match="linear: hook_weights needs every key; .* capture "
                                         "the weights of a forward without a state"):
        attn(torch.randn(1, 4, 16), state=attn.new_state(batch_size=1))


def test_state_checks_and_growth():
    attn = al.build("softmax", dim=16, heads=2, kv_heads=1, causal=True)
    state = attn.new_state(batch_size=3)
    assert state.position == 0 and state.nbytes() == 0
    for _ in range(70):  # grows past the initial capacity several times
        attn(torch.randn(3, 1, 16), state=state)
    assert state.position == 70
    assert state.numbers_per_token("k", "v") == 2 * 1 * 8
    with pytest.raises(ValueError, match="batch_size=3"):
        attn(torch.randn(4, 1, 16), state=state)
    other = al.build("sigmoid", dim=16, heads=2, causal=True)
    with pytest.raises(ValueError, match="made by 'softmax'"):
        other(torch.randn(3, 1, 16), state=state)
    with pytest.raises(ValueError, match="state must come from new_state"):
        attn(torch.randn(3, 1, 16), state="cache")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        attn.new_state(0)


def test_decode_with_gradients_keeps_the_current_chunk_differentiable():
    attn = al.build("softmax", dim=16, heads=2, causal=True)
    state = attn.new_state(1)
    attn(torch.randn(1, 4, 16), state=state)
    x = torch.randn(1, 2, 16, requires_grad=True)
    attn(x, state=state).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in al.available() if al.info(n).decode])
def test_a_state_made_before_module_to_says_to_start_a_new_one(name):
    """Issue 41: after module.double() dma and rcmha failed inside torch ("mat1 and mat2
    must have the same dtype"); every decoding mechanism now names the cause."""
    attn = al.build(name, dim=16, heads=2, causal=True)
    state = attn.new_state(1)
    with torch.no_grad():
        attn(torch.randn(1, 3, 16), state=state)
        attn.double()
        with pytest.raises(ValueError, match=r"float32 on cpu, they are now torch.float64 "
                                             r"on cpu; .* new_state\(\)"):
            attn(torch.randn(1, 1, 16, dtype=torch.float64), state=state)
        fresh = attn.new_state(1)
        assert attn(torch.randn(1, 2, 16, dtype=torch.float64), state=fresh).isfinite().all()


def test_spatial_and_video_inputs():
    attn = al.build("softmax", dim=16, heads=2)
    video = torch.randn(1, 2, 3, 4, 16)
    assert attn(video).shape == video.shape
    img_mask = torch.ones(1, 3, 4, dtype=torch.bool)
    assert attn(video[:, 0], mask=img_mask).shape == (1, 3, 4, 16)
    with pytest.raises(ValueError, match="contradicts"):
        attn(video[:, 0], spatial=(4, 3))


def test_context_errors():
    attn = al.build("softmax", dim=16, heads=2)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="context must be"):
        attn(x, context=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="context_mask given without context"):
        attn(x, context_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass the key padding as context_mask"):
        attn(x, context=x, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs causal=False"):
        al.build("softmax", dim=16, heads=2, causal=True)(x, context=x)


def test_extra_loss_defaults_to_zero_scalar():
    loss = al.build("sigmoid", dim=16, heads=2).extra_loss()
    assert loss.shape == () and loss.item() == 0.0
