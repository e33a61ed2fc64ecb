"""Logit lens, per-head results and direct logit attribution (attnlab.heads.lens) on a tiny
TransformerLM and tiny random Hugging Face GPT-2 / Llama / BERT models."""

import pytest
import torch
from torch import nn

from attnlab import heads as hd
from attnlab.heads import lens
from attnlab.heads import points as pt
from attnlab.heads.metrics import logit_difference
from attnlab.models.transformer_lm import TransformerLM
from tests.heads.test_points import VOCAB, hf_model, tokens
from tests.tolerances import assert_close


def tiny_lm(mechanism: str = "softmax", **mechanism_kwargs) -> TransformerLM:
    """A TransformerLM whose final norm has a bias and whose output projections have biases,
    so that every term of the attribution is exercised."""
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, dim=32, depth=2, heads=4, mechanism=mechanism,
                          mechanism_kwargs={"bias": True, **mechanism_kwargs}).eval()
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.3)
        model.norm.bias.normal_(0.0, 0.3)
    return model


def test_logit_lens_ends_at_the_logits_and_starts_at_the_embeddings():
    model, x = tiny_lm(), tokens()
    table = lens.logit_lens(model, x)
    assert table.shape == (3, 2, 7, VOCAB)
    assert_close(table[-1], model(x))
    assert_close(table[0], model.head(model.norm(model.embed(x))))  # rope: no position table
    cut = lens.logit_lens(model, x, positions=[1, -1])
    assert cut.shape == (3, 2, 2, VOCAB)
    assert_close(cut, table[:, :, [1, 6]])
    with pytest.raises(ValueError, match="differ from the model's logits"):
        lens.logit_lens(model, x, forward=lambda m, t: 2 * m(t))  # a logit scale it can't see
    with pytest.raises(ValueError, match="no final norm and unembedding"):
        lens.logit_lens(hf_model("bert"), x, forward=lambda m, t: m(t).last_hidden_state)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_logit_lens_on_hf_decoders(kind):
    model, x = hf_model(kind), tokens()
    table = lens.logit_lens(model, x, positions=slice(-3, None))
    assert table.shape == (3, 2, 3, VOCAB)
    assert_close(table[-1], model(x).logits[:, -3:])


def test_head_results_sum_to_the_attention_output_and_follow_the_heads():
    model, x = tiny_lm(), tokens()
    results = lens.head_results(model, x)
    _, cache = pt.run_with_cache(model, x, "blocks.*.attn_out")
    for i, r in enumerate(results):
        assert r.shape == (2, 7, 4, 32)
        bias = model.blocks[i].attn.o_proj.bias
        assert_close(r.sum(-2) + bias, cache[f"blocks.{i}.attn_out"], msg=f"block {i}")
    # removing head 2 of block 1 removes exactly its result from the attention output
    with hd.ablate(model, {1: [2]}):
        _, ablated = pt.run_with_cache(model, x, "blocks.1.attn_out")
    assert_close(ablated["blocks.1.attn_out"], cache["blocks.1.attn_out"] - results[1][:, :, 2])
    assert [r.shape for r in lens.head_results(model, x, blocks=[1], positions=-1)] == \
        [(2, 1, 4, 32)]


def test_head_results_refuse_a_mechanism_whose_output_is_not_a_head_sum():
    model = tiny_lm("sigmoid", hybrid_norm=True)  # a LayerNorm after o_proj
    assert "blocks.0.attn_z" not in pt.hook_points(model)
    with pytest.raises(ValueError, match="not a per-head sum.*output_norm"):
        lens.head_results(model, tokens())
    with pytest.raises(ValueError, match="not a per-head sum"):
        lens.direct_logit_attribution(model, tokens(), (1, 2))


@pytest.mark.parametrize("kind", ["gpt2", "bert", pytest.param("llama",
                                                               marks=pytest.mark.slow)])
def test_head_results_on_hf_models(kind):
    model, x = hf_model(kind), tokens()
    forward = (lambda m, t: m(t).last_hidden_state) if kind == "bert" else None
    results = lens.head_results(model, x, forward=forward)
    _, cache = pt.run_with_cache(model, x, "blocks.*.attn_out", forward=forward)
    for i, r in enumerate(results):
        proj = pt.out_projection(model, i)
        bias = 0 if proj.bias is None else proj.bias
        assert_close(r.sum(-2) + bias, cache[f"blocks.{i}.attn_out"], msg=f"{kind} block {i}")


def check_attribution(model: nn.Module, x: torch.Tensor) -> lens.LogitAttribution:
    out = lens.direct_logit_attribution(model, x, (3, 5), position=-2)
    logits = model(x) if isinstance(model, TransformerLM) else model(x).logits
    assert_close(out.total, logits[:, -2, 3] - logits[:, -2, 5])
    assert_close(out.total.mean(), logit_difference(3, 5, position=-2)(logits))
    # the parts sum to the model's logit difference (the scale frozen: exact up to rounding)
    assert_close(out.residual(), torch.zeros(2))
    assert_close(out.heads.sum(-1) + out.attn_bias, out.attn)
    # the same direction written as a vector over the vocabulary, and one token's logit
    d = torch.zeros(VOCAB)
    d[3], d[5] = 1.0, -1.0
    again = lens.direct_logit_attribution(model, x, d, position=-2)
    assert_close(again.heads, out.heads)
    single = lens.direct_logit_attribution(model, x, torch.tensor([3, 3]), position=-2)
    assert_close(single.total, logits[:, -2, 3])
    assert_close(single.residual(), torch.zeros(2))
    return out


def test_direct_logit_attribution_on_a_transformer_lm():
    model, x = tiny_lm(), tokens()
    out = check_attribution(model, x)
    assert out.norm == "LayerNorm" and bool(out.bias.abs().gt(0).all())
    # one head by hand: its result through the final LayerNorm with the scale of this run
    _, cache = pt.run_with_cache(model, x, "blocks.1.resid_post", positions=[-2])
    final = cache["blocks.1.resid_post"][:, 0]
    scale = (final.var(-1, unbiased=False, keepdim=True) + model.norm.eps).sqrt()
    head = lens.head_results(model, x, blocks=[1], positions=[-2])[0][:, 0, 2]
    normed = model.norm.weight * (head - head.mean(-1, keepdim=True)) / scale
    by_hand = normed @ (model.head.weight[3] - model.head.weight[5])
    assert_close(out.heads[:, 1, 2], by_hand)
    assert "block 1" in out.table() and len(out.top_heads(3)) == 3


def test_direct_logit_attribution_on_an_attention_only_lm():
    """An attention-only TransformerLM (mlp_ratio=0) has no mlp_out point: the attribution
    still adds up to the logits, with every MLP term 0."""
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, dim=32, depth=2, heads=4, mlp_ratio=0).eval()
    out = check_attribution(model, tokens())
    assert bool((out.mlp == 0).all()) and bool(out.attn.abs().gt(0).all())


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_direct_logit_attribution_on_hf_decoders(kind):
    out = check_attribution(hf_model(kind), tokens())
    assert out.norm == ("LayerNorm" if kind == "gpt2" else "RMSNorm")


def test_direct_logit_attribution_checks_its_target():
    model, x = tiny_lm(), tokens()
    with pytest.raises(ValueError, match="token ids must be in 0..52"):
        lens.direct_logit_attribution(model, x, (3, VOCAB))
    with pytest.raises(ValueError, match=r"a direction is \(vocab,\)"):
        lens.direct_logit_attribution(model, x, torch.zeros(7))
    # the unembedding is read a chunk of rows at a time: chunks that do not divide the vocab
    d = torch.randn(2, VOCAB, dtype=torch.float64)
    assert_close(lens._readout(d, model.head, chunk=10), d @ model.head.weight.double())


# the matrix rows (attnlab.heads.matrix) beyond GPT-2 / Llama / BERT, with what each must give
MATRIX = {"Mistral": "dla", "Qwen2": "dla", "Phi-3": "dla", "Qwen3": "dla", "gpt-oss": "dla",
          "Falcon (ALiBi)": "dla",  # parallel attention; adds the attention output in place
          "BLOOM": "dla",  # its modules add the residual themselves
          "GPT-NeoX": "dla", "Gemma2": "lens", "OLMo-2": "lens",  # sandwich norms: no DLA
          "Cohere2": "refused",  # a logit scale after the unembedding
          "DistilBERT": "post-norm", "RoBERTa": "post-norm"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_points_and_lens_across_the_architecture_matrix(name):
    transformers = pytest.importorskip("transformers")
    from attnlab.heads import matrix

    arch = next(a for a in matrix.ARCHITECTURES if a.name == name)
    torch.manual_seed(0)
    config = getattr(transformers, arch.config)(**{**arch.options, "vocab_size": VOCAB})
    model, x = getattr(transformers, arch.model)(config).eval(), tokens()
    expect = MATRIX[name]
    forward = (lambda m, t: m(t).last_hidden_state) if expect == "post-norm" else None
    _, cache = pt.run_with_cache(model, x, forward=forward)
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    results = lens.head_results(model, x, forward=forward)
    for i in range(2):
        if expect != "post-norm":
            parts = (cache[f"blocks.{i}.resid_pre"] + cache[f"blocks.{i}.attn_out"]
                     + cache[f"blocks.{i}.mlp_out"])
            assert_close(parts, cache[f"blocks.{i}.resid_post"], msg=f"{name} block {i}")
        if expect in ("dla", "post-norm"):  # sandwich: the heads sum to the norm's input
            proj = pt.out_projection(model, i)
            bias = 0 if proj.bias is None else proj.bias
            assert_close(results[i].sum(-2) + bias, cache[f"blocks.{i}.attn_out"])
    if expect == "refused":
        with pytest.raises(ValueError, match="differ from the model's logits"):
            lens.logit_lens(model, x)
    elif expect in ("dla", "lens"):
        assert_close(lens.logit_lens(model, x)[-1], model(x).logits)
    if expect == "dla":
        out = lens.direct_logit_attribution(model, x, (3, 5))
        assert_close(out.residual(), torch.zeros(2))
    elif expect == "lens":
        with pytest.raises(ValueError, match="norms each attention output"):
            lens.direct_logit_attribution(model, x, (3, 5))


@pytest.mark.slow
def test_attribution_refuses_a_residual_multiplier():
    transformers = pytest.importorskip("transformers")
    config = transformers.GraniteConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB,
                                        residual_multiplier=0.5)
    model = transformers.GraniteForCausalLM(config).eval()
    assert "residual_multiplier=0.5" in pt.hook_points(model)["blocks.0.attn_out"]
    with pytest.raises(ValueError, match="differ from the final residual"):
        lens.direct_logit_attribution(model, tokens(), (3, 5))
