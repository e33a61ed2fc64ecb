"""What every converter shares (attnlab.official._common), through the converters: a bias
whose length is not its weight's row count is refused by name (a longer one was cut
silently, a shorter one failed with an IndexError), and a whole model's state dict given
without ``prefix=`` gets the prefix to pass."""

from __future__ import annotations

import pytest
import torch

from attnlab.official import from_official

from . import test_gated, test_maxvit, test_moh

STATES = {  # mechanism -> (a state dict in its official layout, its converter's arguments)
    "gated": (lambda: test_gated.state("headwise", 2, True, True), {}),
    "maxvit": (lambda: test_maxvit.state("timm"), {"axis": "block"}),
    "moh": (lambda: test_moh.state(2), {"top_k": 2}),
}
BIASES = {"gated": "q_proj.bias", "maxvit": "qkv.bias", "moh": "proj.bias"}


@pytest.mark.parametrize("mechanism", sorted(STATES))
@pytest.mark.parametrize("change", [6, -3])
def test_a_bias_of_the_wrong_length_is_refused_by_name(mechanism, change):
    make, kwargs = STATES[mechanism]
    state = {k: v.detach().clone() for k, v in make().items()}
    key = BIASES[mechanism]
    if key not in state:
        pytest.fail(f"{mechanism}'s test state has no {key}")
    b = state[key]
    state[key] = torch.cat([b, b[:change]]) if change > 0 else b[:change]
    with pytest.raises(ValueError, match=rf"{mechanism}: {key[:-5]}\.bias has shape"):
        from_official(mechanism, state, **kwargs)


@pytest.mark.parametrize("mechanism", sorted(STATES))
def test_a_whole_model_without_prefix_gets_the_prefix_to_pass(mechanism):
    make, kwargs = STATES[mechanism]
    model = {f"blocks.3.attn.{k}": v for k, v in make().items()}
    model["head.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"pass prefix= \(e\.g\. 'blocks\.3\.attn\.'\)"):
        from_official(mechanism, model, **kwargs)
    from_official(mechanism, model, prefix="blocks.3.attn.", **kwargs)  # and that works
