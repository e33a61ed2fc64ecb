"""Hook points beyond attention (attnlab.heads.points): the residual identities on attnlab and
unmodified Hugging Face models, run_with_cache against independent hooks, positions, the
memory bound, and edit_points (effect, removal on exit and on an exception)."""

import pytest
import torch
from torch import nn

from attnlab import heads as hd
from attnlab.heads import points as pt
from attnlab.models.transformer_lm import TransformerLM
from tests.tolerances import assert_close

VOCAB = 53


def tiny_lm(**kw) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(VOCAB, dim=32, depth=2, heads=4, **kw).eval()


def tokens(b: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(1))


def hf_model(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers",
                                       reason="needs the hf extra: pip install -e '.[hf]'")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                         bos_token_id=1, eos_token_id=2)
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=VOCAB)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=VOCAB)
    return transformers.BertModel(config).eval()


def hidden(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).last_hidden_state  # BERT has no logits


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def no_hooks_left(model: nn.Module, before: int = 0) -> bool:
    """Whether the model holds as many hooks as ``before`` (transformers keeps some of its
    own on its models)."""
    return hook_count(model) == before


def test_residual_identities_on_a_transformer_lm():
    model, x = tiny_lm(positions="learned"), tokens()
    logits, cache = pt.run_with_cache(model, x)
    assert_close(logits, model(x))
    emb = model.embed(x) + model.pos(torch.arange(x.shape[1]))
    assert torch.equal(cache["embed"], emb)
    assert torch.equal(cache["blocks.0.resid_pre"], cache["embed"])
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    for i in range(2):
        parts = (cache[f"blocks.{i}.resid_pre"] + cache[f"blocks.{i}.attn_out"]
                 + cache[f"blocks.{i}.mlp_out"])
        assert_close(parts, cache[f"blocks.{i}.resid_post"], msg=f"block {i}")
    assert torch.equal(model.norm(cache["blocks.1.resid_post"]), cache["final_norm"])
    assert torch.equal(model.head(cache["final_norm"]), logits)
    assert cache.stack("resid_post").shape == (2, 2, 7, 32)
    assert cache["L1.heads"].shape == (2, 7, 4, 8) and cache["L0.weights"].shape == (2, 4, 7, 7)
    assert all(t.device == x.device for _, t in cache.items())
    assert no_hooks_left(model)


def test_run_with_cache_equals_what_an_independent_hook_sees():
    model, x = tiny_lm(), tokens()
    seen = {}
    handles = [model.blocks[1].mlp.register_forward_hook(
                   lambda m, i, o: seen.__setitem__("mlp", o.clone())),
               model.blocks[1].register_forward_pre_hook(
                   lambda m, args: seen.__setitem__("pre", args[0].clone())),
               model.blocks[0].attn.hook_weights.register_forward_hook(
                   lambda m, i, o: seen.__setitem__("w", o.clone()))]
    try:
        _, cache = pt.run_with_cache(model, x, ["blocks.1.mlp_out", "blocks.1.resid_pre",
                                                "L0.weights"])
    finally:
        for h in handles:
            h.remove()
    assert cache.names() == ["L0.weights", "blocks.1.resid_pre", "blocks.1.mlp_out"]  # as run
    assert torch.equal(cache["blocks.1.mlp_out"], seen["mlp"])
    assert torch.equal(cache["blocks.1.resid_pre"], seen["pre"])
    assert torch.equal(cache["L0.weights"], seen["w"])
    assert not cache["blocks.1.mlp_out"].requires_grad


def test_positions_keep_the_sequence_axis_of_each_point():
    model, x = tiny_lm(), tokens(length=9)
    names = ["blocks.0.resid_post", "L1.q", "L1.weights", "L1.heads", "blocks.1.attn_z"]
    _, full = pt.run_with_cache(model, x, names)
    for positions, index in ((slice(2, 6), [2, 3, 4, 5]), ([0, -1], [0, 8]), (-2, [7])):
        _, cut = pt.run_with_cache(model, x, names, positions=positions)
        i = torch.tensor(index)
        assert torch.equal(cut["blocks.0.resid_post"], full["blocks.0.resid_post"][:, i])
        assert torch.equal(cut["L1.q"], full["L1.q"][:, :, i])
        assert torch.equal(cut["L1.weights"], full["L1.weights"][:, :, i])  # query rows
        assert torch.equal(cut["L1.heads"], full["L1.heads"][:, i])
        assert torch.equal(cut["blocks.1.attn_z"], full["blocks.1.attn_z"][:, i])
    with pytest.raises(ValueError, match="position 9 out of range"):
        pt.run_with_cache(model, x, "embed", positions=[9])


def test_the_memory_bound_stops_before_the_point_that_would_exceed_it():
    model, x = tiny_lm(), tokens()
    one = 2 * 7 * 32 * 4  # bytes of a (2, 7, 32) float32 residual point
    names = ["blocks.0.resid_pre", "blocks.0.attn_out", "blocks.0.mlp_out",
             "blocks.1.resid_post"]
    ran = []
    handle = model.blocks[1].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        with pytest.raises(pt.CacheFull, match=r"blocks\.0\.mlp_out.*max_bytes=") as err:
            pt.run_with_cache(model, x, names, max_bytes=2 * one + one // 2)
    finally:
        handle.remove()
    assert err.value.point == "blocks.0.mlp_out"
    assert err.value.stored_bytes == 2 * one <= err.value.max_bytes
    assert not ran, "the forward went on past the point that broke the bound"
    assert no_hooks_left(model)
    _, cache = pt.run_with_cache(model, x, names, max_bytes=4 * one)
    assert cache.nbytes == 4 * one
    _, cut = pt.run_with_cache(model, x, names, positions=-1, max_bytes=4 * one // 7)
    assert cut.nbytes == 4 * one // 7


def test_unknown_names_suggest_close_ones():
    model = tiny_lm()
    with pytest.raises(ValueError, match="did you mean blocks.0.resid_post"):
        pt.run_with_cache(model, tokens(), ["blocks.0.resid_pst"])
    with pytest.raises(ValueError, match="no hook point matches 'blocks.7.*'"):
        pt.run_with_cache(model, tokens(), "blocks.7.*")
    with pytest.raises(ValueError, match="did you mean blocks.1.attn_out"):
        with pt.edit_points(model, {"blocks.1.atn_out": lambda t: t}):
            pass
    with pytest.raises(ValueError, match="blocks.1.mlp_out, blocks.1.resid_post did not run"):
        pt.run_with_cache(model, tokens(), "blocks.1.*", forward=lambda m, t: m.blocks[0](
            m.embed(t)))
    with pytest.raises(ValueError, match="no residual stack found"):
        pt.hook_points(nn.Sequential(nn.Linear(3, 3)))


def test_zeroing_attn_out_equals_ablating_every_head_of_the_layer():
    model, x = tiny_lm(), tokens()
    before = model(x)
    with pt.edit_points(model, {"blocks.0.attn_out": torch.zeros_like}):
        edited = model(x)
        _, cache = pt.run_with_cache(model, x, ["blocks.0.attn_out", "blocks.0.resid_post"])
    with hd.ablate(model, {0: range(4)}):  # o_proj has no bias: its output is 0 too
        ablated = model(x)
    assert_close(edited, ablated)
    assert not torch.allclose(edited, before)
    assert torch.equal(cache["blocks.0.attn_out"], torch.zeros(2, 7, 32))  # the edited value
    assert torch.equal(model(x), before) and no_hooks_left(model)


def test_edits_of_block_inputs_and_heads_and_their_removal_on_an_exception():
    model, x = tiny_lm(), tokens()
    shift = torch.randn(32)
    _, clean = pt.run_with_cache(model, x, ["blocks.0.resid_post", "blocks.1.resid_pre"])
    with pt.edit_points(model, {"blocks.1.resid_pre": lambda t: t + shift,
                                "blocks.0.attn_z": lambda z: z * 2}):
        _, cache = pt.run_with_cache(model, x, ["blocks.0.attn_out", "blocks.0.resid_post",
                                                "blocks.1.resid_pre"])
    _, plain = pt.run_with_cache(model, x, ["blocks.0.attn_out"])
    assert_close(cache["blocks.0.attn_out"], 2 * plain["blocks.0.attn_out"])
    # resid_post of block 0 is the block's own output: the edit acts on block 1's input
    assert_close(cache["blocks.1.resid_pre"], cache["blocks.0.resid_post"] + shift)
    with pytest.raises(RuntimeError, match="boom"):
        with pt.edit_points(model, {"embed": lambda t: t * 0, "L1.heads": lambda t: t}):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    with pytest.raises(ValueError, match="returned shape"):
        with pt.edit_points(model, {"blocks.0.mlp_out": lambda t: t[:, :1]}):
            model(x)
    assert no_hooks_left(model)
    _, again = pt.run_with_cache(model, x, ["blocks.0.resid_post", "blocks.1.resid_pre"])
    assert torch.equal(again["blocks.1.resid_pre"], clean["blocks.1.resid_pre"])


def test_residual_branches_of_a_block_are_their_own_points():
    from attnlab.models.encoder import Encoder

    torch.manual_seed(0)
    model = Encoder(dim=32, depth=1, heads=4, mechanism="l2vit").eval()  # CPE before, LCM after
    names = list(pt.hook_points(model))
    assert names[:7] == ["embed", "blocks.0.resid_pre", "blocks.0.before_out",
                         "blocks.0.attn_out", "blocks.0.attn_z", "blocks.0.after_out",
                         "blocks.0.mlp_out"]
    x = torch.randn(2, 4, 4, 32)  # an image grid: the blocks see (B, H, W, dim)
    out, cache = pt.run_with_cache(model, x, "blocks.*")
    parts = sum(cache[f"blocks.0.{p}"] for p in ("resid_pre", "before_out", "attn_out",
                                                   "after_out", "mlp_out"))
    assert_close(parts, cache["blocks.0.resid_post"])
    assert torch.equal(model.norm(cache["blocks.0.resid_post"]), out)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_residual_identities_on_unmodified_hf_decoders(kind):
    model, x = hf_model(kind), tokens()
    names = pt.hook_points(model)
    assert "final_norm" in names and not any(n.startswith("L0.") for n in names)
    logits, cache = pt.run_with_cache(model, x)
    out = model(x, output_hidden_states=True)
    assert torch.equal(logits, out.logits)
    for i in range(2):  # transformers' own hidden states are the block inputs
        assert torch.equal(cache[f"blocks.{i}.resid_pre"], out.hidden_states[i])
        parts = (cache[f"blocks.{i}.resid_pre"] + cache[f"blocks.{i}.attn_out"]
                 + cache[f"blocks.{i}.mlp_out"])
        assert_close(parts, cache[f"blocks.{i}.resid_post"], msg=f"{kind} block {i}")
    assert torch.equal(cache["embed"], cache["blocks.0.resid_pre"])
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    lay = pt.layout(model)
    assert torch.equal(lay.final_norm(cache["blocks.1.resid_post"]), cache["final_norm"])
    assert_close(model.get_output_embeddings()(cache["final_norm"]), logits)
    own_hooks = hook_count(model)  # transformers adds its own in a first forward
    with pt.edit_points(model, {"blocks.1.mlp_out": lambda t: t * 0}):
        edited = model(x).logits
    assert not torch.allclose(edited, logits) and no_hooks_left(model, own_hooks)
    shift = torch.randn(32)
    with pt.edit_points(model, {"embed": lambda t: t + shift,
                                "blocks.1.resid_pre": lambda t: t - shift}):
        _, moved = pt.run_with_cache(model, x, ["blocks.0.resid_pre", "blocks.1.resid_pre",
                                                "blocks.0.resid_post"])
    assert_close(moved["blocks.0.resid_pre"], cache["embed"] + shift)
    assert_close(moved["blocks.1.resid_pre"], moved["blocks.0.resid_post"] - shift)
    assert no_hooks_left(model, own_hooks)


def test_bert_points_are_post_norm_and_the_head_points_need_use_attnlab():
    model, x = hf_model("bert"), tokens()
    lay = pt.layout(model)
    assert lay.family == "post-norm" and lay.final_norm is None
    assert "final_norm" not in pt.hook_points(model)
    _, cache = pt.run_with_cache(model, x, forward=hidden)
    layer = model.encoder.layer[0]
    mid = layer.attention.output.LayerNorm(cache["blocks.0.attn_out"]
                                           + cache["blocks.0.resid_pre"])
    assert_close(layer.output.LayerNorm(cache["blocks.0.mlp_out"] + mid),
                 cache["blocks.0.resid_post"])
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    from attnlab.integrations import hf

    hf.use_attnlab(model)
    _, heads = pt.run_with_cache(model, x, ["L1.weights", "blocks.1.attn_z"], forward=hidden,
                                 positions=[0])
    assert heads["L1.weights"].shape == (2, 4, 1, 7) and heads["blocks.1.attn_z"].shape == \
        (2, 1, 4, 8)


def test_attention_only_blocks_have_no_mlp_point_and_the_identity_still_holds():
    model, x = tiny_lm(mlp_ratio=0), tokens()
    assert model.blocks[0].mlp is None
    names = pt.hook_points(model)
    assert "blocks.0.mlp_out" not in names and "blocks.0.attn_out" in names
    logits, cache = pt.run_with_cache(model, x)
    assert_close(logits, model(x))
    for i in range(2):
        assert_close(cache[f"blocks.{i}.resid_pre"] + cache[f"blocks.{i}.attn_out"],
                     cache[f"blocks.{i}.resid_post"], msg=f"block {i}")
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    with pytest.raises(ValueError, match="no hook point matches 'blocks.0.mlp_out'"):
        pt.run_with_cache(model, x, ["blocks.0.mlp_out"])
