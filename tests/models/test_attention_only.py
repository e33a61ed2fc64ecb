"""Attention-only language models: ``TransformerLM(..., mlp_ratio=0)`` and the arena's
``mlp_ratio = 0``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnlab.models import TransformerLM
from attnlab.models.blocks import Block
from tests.tolerances import assert_close


def _attention_only_forward(model: TransformerLM, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of a softmax, learned-position, attention-only TransformerLM written out by
    hand from its parameters: x = E[t] + P[i]; per block x += W_o softmax(q k^T / sqrt(d)
    + causal mask) v with q, k, v from LayerNorm_1(x); logits = W_head LayerNorm(x)."""
    params = {k: v.double() for k, v in model.state_dict().items()}
    batch, length = tokens.shape
    x = params["embed.weight"][tokens] + params["pos.weight"][:length]
    heads = model.blocks[0].attn.heads

    def norm(h: torch.Tensor, prefix: str) -> torch.Tensor:
        centred = h - h.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        return centred / scale * params[f"{prefix}.weight"] + params[f"{prefix}.bias"]

    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    for i in range(len(model.blocks)):
        h = norm(x, f"blocks.{i}.norm1")
        q, k, v = (h @ params[f"blocks.{i}.attn.qkv.{p}.weight"].T for p in "qkv")
        q, k, v = (t.view(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + y @ params[f"blocks.{i}.attn.o_proj.weight"].T
    return norm(x, "norm") @ params["head.weight"].T


def test_attention_only_model_has_no_mlp_and_matches_the_hand_written_forward():
    torch.manual_seed(0)
    model = TransformerLM(13, dim=16, depth=2, heads=2, positions="learned", max_len=16,
                          mlp_ratio=0).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if ".mlp." in n or ".norm2." in n], names
    assert all(b.mlp is None and b.norm2 is None for b in model.blocks)
    # a default model of the same shape has the MLP and the second norm in every block
    full = TransformerLM(13, dim=16, depth=2, heads=2, positions="learned", max_len=16)
    extra = {n for n, _ in full.named_parameters()} - set(names)
    assert extra == {f"blocks.{i}.{part}" for i in range(2) for part in
                     ("norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias",
                      "mlp.2.weight", "mlp.2.bias")}
    tokens = torch.randint(0, 13, (3, 9))
    with torch.no_grad():
        logits = model(tokens)
    expected = _attention_only_forward(model, tokens)
    assert_close(logits, expected, roundings=256)  # float32 against float64
    # the default block's output differs: the check above would see an MLP left in
    with torch.no_grad():
        full.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(full.eval()(tokens).double(), expected, atol=1e-3)


def test_attention_only_decodes_with_states_like_the_full_recompute():
    torch.manual_seed(1)
    model = TransformerLM(17, dim=16, depth=2, heads=4, mlp_ratio=0).eval()
    prompt = torch.randint(0, 17, (2, 4))
    out = model.generate(prompt, 3, temperature=0)
    with torch.no_grad():
        assert torch.equal(out[:, -1], model(out[:, :-1])[:, -1].argmax(-1))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_mlp_ratio_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="mlp_ratio must be an integer >= 0"):
        Block(8, 2, "softmax", {}, bad, 0.0)


def test_arena_accepts_mlp_ratio_zero_and_builds_an_attention_only_model():
    from attnlab.arena.config import Sweep
    from attnlab.tasks import make_task

    sweep = Sweep.model_validate({"task": "induction", "mechanisms": ["softmax"],
                                  "model": {"mlp_ratio": 0, "depth": 2}})
    assert sweep.model["mlp_ratio"] == 0
    with pytest.raises(ValueError, match="mlp_ratio"):
        Sweep.model_validate({"task": "induction", "mechanisms": ["softmax"],
                              "model": {"mlp_ratio": -1}})
    model = make_task("induction", vocab=16, length=16, segment=3).build_model(
        "softmax", {}, dim=16, depth=2, heads=2, mlp_ratio=0)
    assert isinstance(model, nn.Module)
    assert all(b.mlp is None for b in model.blocks)
