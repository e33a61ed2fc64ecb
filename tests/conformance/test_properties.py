"""Generated valid configurations of every registered mechanism (hypothesis, issue 41).

Each example draws a mechanism, a mode it supports, the head layout (heads, head width, GQA
where supported, qk-norm, RoPE, a gate), a batch, a length (as a grid for image-only
mechanisms) and a key padding mask with arbitrary contents at the padded positions, and
checks what the contract promises for any valid input:

- the real outputs are finite and do not depend on what padding holds (here: NaN, 1e30 or
  noise);
- the gradients of a loss over the real outputs are finite (padding that is finite noise);
- decoding token by token equals the full forward, and backward() through the decode works.

A new mechanism is covered without writing a test for it. The default profile runs a few
examples per mechanism (the default pytest stays within its budget); ``-m slow`` runs a
larger one.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab as al

from ..tolerances import assert_close

MECHANISMS = al.available()
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configurations(draw, name: str):
    info = al.info(name)
    causal = draw(st.sampled_from([m for m, ok in ((True, info.causal),
                                                  (False, info.bidirectional)) if ok]))
    heads = draw(st.sampled_from([2, 4] if name in ("moh", "maxvit") else [1, 2, 4]))
    head_width = draw(st.sampled_from([4, 8]))
    kwargs: dict = {}
    if "kv_heads" not in info.unsupported and heads > 1:
        kwargs["kv_heads"] = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    if "qk_norm" not in info.unsupported:
        kwargs["qk_norm"] = draw(st.booleans())
    if "rope" not in info.unsupported and name not in ("cca",):
        kwargs["rope"] = draw(st.booleans())
    if "gate" not in info.unsupported:
        gates = ["headwise", "elementwise"] + ([] if name == "gated" else [None])  # gated
        kwargs["gate"] = draw(st.sampled_from(gates))  # is its gate
    dim = max(heads * head_width, 32 if name == "shvit" else 0)
    batch = draw(st.integers(1, 2))
    if "seq" in info.domains:
        grid = None
        length = draw(st.integers(1, 12))
    else:
        grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        length = math.prod(grid)
    keep = draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length),
                         min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**16))
    return dict(name=name, causal=causal, heads=heads, dim=dim, kwargs=kwargs, batch=batch,
                length=length, grid=grid, keep=torch.tensor(keep, dtype=torch.bool),
                seed=seed)


def build(c: dict) -> al.Attention | None:
    """The module, or None when the mechanism refuses the combination with a ValueError
    that names it (a documented limit, e.g. a head width its kernel needs): refusing
    clearly is within the contract, failing inside torch is not."""
    torch.manual_seed(c["seed"])
    try:
        attn = al.build(c["name"], dim=c["dim"], heads=c["heads"], causal=c["causal"],
                        **c["kwargs"])
    except ValueError as err:
        assert c["name"] in str(err), err
        return None
    return attn.double().eval()


def check(c: dict) -> None:
    attn = build(c)
    if attn is None:
        return
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["batch"], c["length"], c["dim"], generator=g, dtype=torch.float64)
    keep = c["keep"]
    extra = {} if c["grid"] is None else {"spatial": c["grid"]}
    y = attn(x, mask=keep, **extra)
    assert torch.isfinite(y[keep]).all()
    for value in (float("nan"), 1e30):
        y2 = attn(x.masked_fill(~keep[..., None], value), mask=keep, **extra)
        assert_close(y2[keep], y[keep], msg=f"padding {value}")
    loss = y[keep].sum()
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, [p for p in attn.parameters() if p.requires_grad],
                                    allow_unused=True)
        assert all(gr is None or torch.isfinite(gr).all() for gr in grads)
    info = al.info(c["name"])
    if info.decode and c["causal"] and c["grid"] is None and c["length"] > 1:
        state = attn.new_state(batch_size=c["batch"])
        first = c["length"] // 2 or 1
        parts = [attn(x[:, :first], mask=keep[:, :first], state=state)]
        parts += [attn(x[:, t:t + 1], mask=keep[:, t:t + 1], state=state)
                  for t in range(first, c["length"])]
        decoded = torch.cat(parts, 1)
        assert_close(decoded[keep], y[keep], msg="decode")
        decoded[keep].sum().backward()  # backward through the decode steps


@pytest.mark.parametrize("examples", [6, pytest.param(30, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", MECHANISMS)
def test_generated_valid_configurations_hold_the_contract(name, examples):
    @settings(max_examples=examples, **SETTINGS)
    @given(configurations(name))
    def run(c):
        check(c)

    run()
