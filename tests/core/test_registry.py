import pytest
import torch

import attnlab as al
from attnlab.core import registry


@pytest.fixture
def temporary_registry():
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def test_available_lists_the_section_a_mechanisms():
    assert {"softmax", "sigmoid", "softplus", "gated", "selective"} <= set(al.available())
    assert al.available(family="scored") == sorted(al.available(family="scored"))
    assert "softplus" not in al.available(domain="image")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'sigmoid'"):
        al.build("sigmod", dim=8, heads=2)
    with pytest.raises(ValueError, match="Available: .*gated.*softmax"):
        al.info("no-such-thing")


def test_build_rejects_unknown_arguments_and_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['heads_dim'\].*max_len"):
        al.build("sigmoid", dim=8, heads=2, heads_dim=4)


def test_info_carries_metadata_and_defaults():
    i = al.info("sigmoid")
    assert i.paper.startswith("Theory, Analysis")
    assert (i.causal, i.bidirectional, i.decode, i.weights) == (True, True, True, True)
    assert i.defaults["max_len"] == 1024 and i.defaults["hybrid_norm"] is False
    assert i.doc.startswith("Sigmoid attention")
    assert al.info("softplus").defaults["reweight_p"] == 15.0


def test_registering_a_taken_name_with_another_class_fails(temporary_registry):
    with pytest.raises(ValueError, match="already registered"):
        @al.register("softmax", family="x", paper="p", causal=True, bidirectional=True,
                     decode=False, complexity="n")
        class Other(al.Attention):
            pass


def test_a_new_mechanism_plugs_in_and_its_modes_are_enforced(temporary_registry):
    @al.register("toy_bidir", family="test", paper="none", causal=False, bidirectional=True,
                 decode=False, complexity="n^2 d")
    class ToyBidirectional(al.Attention):
        """Mean of the values (uniform attention)."""

        def attend(self, q, k, v, call):
            return self.expand_kv(v).mean(2, keepdim=True).expand(-1, -1, q.shape[2], -1)

    assert "toy_bidir" in al.available()
    attn = al.build("toy_bidir", dim=8, heads=2)
    assert attn.causal is False
    assert attn(torch.randn(1, 5, 8)).shape == (1, 5, 8)
    with pytest.raises(ValueError, match="toy_bidir supports only bidirectional"):
        al.build("toy_bidir", dim=8, heads=2, causal=True)
    with pytest.raises(ValueError, match="cannot decode"):
        attn.new_state(1)
    with pytest.raises(ValueError, match="cannot decode"):
        attn(torch.randn(1, 5, 8), state=al.State("toy_bidir", 1))
    with pytest.raises(ValueError, match="does not support cross-attention"):
        attn(torch.randn(1, 5, 8), context=torch.randn(1, 3, 8))


def test_causal_only_mechanism_defaults_to_causal(temporary_registry):
    @al.register("toy_causal", family="test", paper="none", causal=True, bidirectional=False,
                 decode=False, complexity="n", unsupported=("rope",))
    class ToyCausal(al.Attention):
        """Identity on values."""

        def attend(self, q, k, v, call):
            return self.expand_kv(v)

    assert al.build("toy_causal", dim=8, heads=2).causal is True
    with pytest.raises(ValueError, match="does not support the 'rope' option"):
        al.build("toy_causal", dim=8, heads=2, rope=True)


def test_register_validates_its_own_arguments():
    with pytest.raises(ValueError, match="causal or bidirectional"):
        al.register("x", family="f", paper="p", causal=False, bidirectional=False,
                    decode=False, complexity="n")
    with pytest.raises(ValueError, match="unknown common options"):
        al.register("x", family="f", paper="p", causal=True, bidirectional=False,
                    decode=False, complexity="n", unsupported=("flash",))
