"""Edge attribution patching with MLP nodes (``edge_attribution_patching(..., mlps=True)``)
against direct edge patching written here: the sender's contribution (the embeddings, one
head's share of its attention output, one MLP's output) added to one receiver's input only
(one head's q, k or v input, one MLP's input residual, the logits' residual), everything
else running as in the base run. Its derivative at t = 0 is what EAP estimates, so the two
agree to rounding on any model; where the receiver's path to the metric is linear, EAP is
direct edge patching itself. The hooks below find the modules by hand (TransformerLM's
``norm1``/``norm2``/``mlp``, GPT-2's ``ln_2``, Llama's ``post_attention_layernorm``), not
through ``heads.points``."""

import types

import pytest
import torch
from torch import Tensor, nn

from attnlab.heads import attribution as at
from attnlab.heads.metrics import logit_difference
from attnlab.models.transformer_lm import TransformerLM
from tests.tolerances import assert_close

VOCAB, BATCH, LENGTH = 23, 3, 7


def lm(depth: int = 2, *, linear: bool = False, mlp_ratio: int = 4, seed: int = 0
       ) -> TransformerLM:
    """A tiny TransformerLM with MLPs; ``linear``: no norms and MLPs without their GELU, so
    every block is linear in its input but for the attention pattern."""
    torch.manual_seed(seed)
    model = TransformerLM(VOCAB, dim=16, depth=depth, heads=4, max_len=16, mlp_ratio=mlp_ratio,
                          embed_std=1.0 if linear else 0.1).eval()
    if linear:
        for block in model.blocks:
            block.norm1, block.norm2 = nn.Identity(), nn.Identity()
            block.mlp[1] = nn.Identity()
        model.norm = nn.Identity()
    return model


def inputs(seed: int = 1) -> tuple[Tensor, Tensor, object]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    corrupted = clean.clone()
    changed = [0, 1, 2, 3, LENGTH - 1]
    corrupted[:, changed] = torch.randint(0, VOCAB, (BATCH, len(changed)), generator=g)
    correct = torch.randint(0, VOCAB, (BATCH,), generator=g)
    wrong = (correct + 1 + torch.randint(0, VOCAB - 1, (BATCH,), generator=g)) % VOCAB
    return clean, corrupted, logit_difference(correct, wrong)


# ------------------------------------------------------------- the parts, by hand


class Parts:
    """Where a model's pieces are (found by hand for each architecture): ``blocks``, per block
    the attention module (its output: the attention sublayer's, a tuple on HF), its hook_heads
    module, the output projection's weight as (dim, heads * head_dim), the MLP module, the
    MLP's norm, the attention's norm; the final norm."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.kind = kind
        if kind == "lm":
            self.blocks = list(model.blocks)
            self.attn = [b.attn for b in self.blocks]
            self.heads_hook = [b.attn.hook_heads for b in self.blocks]
            self.o_weight = [b.attn.o_proj.weight for b in self.blocks]
            self.mlp = [b.mlp for b in self.blocks]
            self.mlp_norm = [b.norm2 for b in self.blocks]
            self.final_norm = model.norm
        elif kind == "gpt2":
            self.blocks = list(model.transformer.h)
            self.attn = [b.attn for b in self.blocks]
            self.heads_hook = [b.attn.attnlab_site.hook_heads for b in self.blocks]
            self.o_weight = [b.attn.c_proj.weight.T for b in self.blocks]  # Conv1D: x @ W
            self.mlp = [b.mlp for b in self.blocks]
            self.mlp_norm = [b.ln_2 for b in self.blocks]
            self.final_norm = model.transformer.ln_f
        else:  # llama
            self.blocks = list(model.model.layers)
            self.attn = [b.self_attn for b in self.blocks]
            self.heads_hook = [b.self_attn.attnlab_site.hook_heads for b in self.blocks]
            self.o_weight = [b.self_attn.o_proj.weight for b in self.blocks]
            self.mlp = [b.mlp for b in self.blocks]
            self.mlp_norm = [b.post_attention_layernorm for b in self.blocks]
            self.final_norm = model.model.norm


def run(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out if isinstance(out, Tensor) else out.logits


def first(value):
    return value[0] if isinstance(value, tuple) else value


def record(model: nn.Module, parts: Parts, x: Tensor) -> dict:
    """The base values each edge needs: the residual entering each block, each attention's
    output and hook_heads, each MLP's output."""
    seen: dict = {}
    handles = []
    for i, block in enumerate(parts.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(("pre", i), first(
                a if a else (kw["hidden_states"],)).detach()), with_kwargs=True))
        handles.append(parts.attn[i].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("attn", i), first(out).detach())))
        handles.append(parts.heads_hook[i].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("heads", i), out.detach())))
        handles.append(parts.mlp[i].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("mlp", i), out.detach())))
    try:
        with torch.no_grad():
            run(model, x)
    finally:
        for h in handles:
            h.remove()
    return seen


def contribution(parts: Parts, base: dict, target: dict, sender) -> Tensor:
    """What the sender adds to the residual in the target run minus in the base run."""
    if sender == "embed":
        return target["pre", 0] - base["pre", 0]
    if sender[0] == "mlp":
        return target["mlp", sender[1]] - base["mlp", sender[1]]
    layer, head = sender
    dz = torch.zeros_like(base["heads", layer])  # (B, L, H, D)
    dz[:, :, head] = target["heads", layer][:, :, head] - base["heads", layer][:, :, head]
    return dz.flatten(2) @ parts.o_weight[layer].T


def edge_patched(model, parts: Parts, x, base: dict, delta: Tensor, receiver, metric):
    """metric of the base run with ``delta`` added to ``receiver``'s input only."""
    if receiver == "logits":
        hook = parts.final_norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,))
    elif receiver[0] == "mlp":
        layer = receiver[1]
        mid = base["pre", layer] + base["attn", layer]  # the residual the MLP reads
        fed = parts.mlp[layer](parts.mlp_norm[layer](mid + delta))
        hook = parts.mlp[layer].register_forward_hook(lambda m, a, out: fed)
    else:
        layer, head, point = receiver
        assert parts.kind == "lm"
        block = parts.blocks[layer]
        probe = getattr(block.attn, f"hook_{point}")
        seen = {}
        grab = probe.register_forward_hook(lambda m, a, out: seen.update(v=out))
        try:
            block.attn(block.norm1(base["pre", layer] + delta))
        finally:
            grab.remove()

        def replace(m, a, out):
            keep = torch.zeros_like(out)
            keep[:, head] = 1
            return out + keep * (seen["v"] - out)
        hook = probe.register_forward_hook(replace)
    try:
        return metric(run(model, x))
    finally:
        hook.remove()


def by_hand(model, parts, clean, corrupted, metric, edges, direction, derivative):
    """Each edge patched directly: d metric / d t at t = 0 (``derivative``) or metric(t = 1)
    - metric(base run)."""
    x, other = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    base, target = record(model, parts, x), record(model, parts, other)
    with torch.no_grad():
        unpatched = metric(run(model, x))
    out = []
    for sender, receiver in edges:
        delta = contribution(parts, base, target, sender)
        if derivative:
            t = torch.zeros((), requires_grad=True)
            value = edge_patched(model, parts, x, base, t * delta, receiver, metric)
            out.append(torch.autograd.grad(value, t)[0])
        else:
            with torch.no_grad():
                out.append(edge_patched(model, parts, x, base, delta, receiver, metric)
                           - unpatched)
    return torch.stack(out)


def sender_name(sender) -> str:
    if sender == "embed":
        return "embed"
    return f"L{sender[1]}.MLP" if sender[0] == "mlp" else f"L{sender[0]}.H{sender[1]}"


def receiver_name(receiver) -> str:
    if receiver == "logits":
        return "logits"
    if receiver[0] == "mlp":
        return f"L{receiver[1]}.MLP.in"
    return f"L{receiver[0]}.H{receiver[1]}.{receiver[2]}"


def scores_of(edges: at.EdgeScores, pairs) -> Tensor:
    return torch.tensor([edges.score(sender_name(u), receiver_name(v)) for u, v in pairs])


# every kind of edge the MLP nodes add, and two of the old kinds
MLP_EDGES = [("embed", ("mlp", 0)), ((0, 1), ("mlp", 0)), ((0, 3), ("mlp", 1)),
             (("mlp", 0), (1, 2, "q")), (("mlp", 0), (1, 0, "k")), (("mlp", 0), (1, 3, "v")),
             (("mlp", 0), ("mlp", 1)), (("mlp", 0), "logits"), (("mlp", 1), "logits"),
             ((1, 2), ("mlp", 1)), ("embed", ("mlp", 1)), ((0, 2), (1, 1, "k")),
             ((1, 0), "logits")]


# ----------------------------------------------------------------------- the tests


@pytest.mark.parametrize("direction", ["noise", pytest.param("denoise", marks=pytest.mark.slow)])
def test_mlp_edges_are_the_derivative_of_direct_edge_patching(direction):
    """Two blocks with norms and GELU MLPs: each edge's score is d/dt metric(the sender's
    contribution times t added to the receiver's input only) at t = 0."""
    model = lm()
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, direction=direction,
                                         mlps=True)
    want = by_hand(model, Parts(model, "lm"), clean, corrupted, metric, MLP_EDGES, direction,
                   True)
    assert_close(scores_of(edges, MLP_EDGES), want)
    assert want.abs().min() > 1e-4  # every edge checked matters


def test_mlp_edges_equal_direct_edge_patching_where_the_path_is_linear():
    """No norms, MLPs without their GELU: the last block's MLP and values, the attention
    output (linear in v) and the logits are linear in what they read, so EAP on the edges
    into L1.MLP.in, L1.H*.v and the logits is direct edge patching itself, from every kind of
    sender (the embeddings, a head, an MLP)."""
    model = lm(linear=True)
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True)
    senders = ["embed", (0, 0), (0, 2), ("mlp", 0)]
    pairs = [(u, v) for u in senders for v in [("mlp", 1), (1, 1, "v"), (1, 3, "v"), "logits"]]
    pairs += [((1, h), ("mlp", 1)) for h in range(4)] + [((1, 2), "logits"),
                                                         (("mlp", 1), "logits")]
    want = by_hand(model, Parts(model, "lm"), clean, corrupted, metric, pairs, "noise", False)
    assert_close(scores_of(edges, pairs), want)
    assert want.abs().min() > 1e-3


def atp_per_sender(model, clean, corrupted, metric, direction, steps=1) -> Tensor:
    """AtP of each sender in EAP's row order (embed, per block its heads then its MLP): the
    embeddings as resid_pre of block 0, the heads as hook_heads, the MLPs as mlp_out."""
    kw = {"direction": direction, "steps": steps}
    heads = at.attribution_patching(model, clean, corrupted, metric, point="heads", **kw)
    mlp = at.attribution_patching(model, clean, corrupted, metric, point="mlp_out", **kw)
    embed = at.attribution_patching(model, clean, corrupted, metric, point="resid_pre", **kw)
    rows = [embed.scores[:1]]
    for layer in range(heads.scores.shape[0]):
        rows += [heads.scores[layer], mlp.scores[layer:layer + 1]]
    return torch.cat(rows)


@pytest.mark.parametrize("direction", ["noise", pytest.param("denoise", marks=pytest.mark.slow)])
def test_edges_out_of_every_sender_add_up_to_its_atp(direction):
    """With MLP nodes everything that reads the residual is a receiver (q, k, v of every
    head, every MLP, the logits): the edges out of each sender add up to its AtP score, with
    the MLPs at work (without MLP nodes this needs MLPs that add nothing)."""
    model = lm()
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, direction=direction,
                                         mlps=True)
    assert_close(edges.scores.sum(1), atp_per_sender(model, clean, corrupted, metric,
                                                     direction))


def test_the_graph_with_mlp_nodes_and_the_edges_it_keeps():
    """Names in model order, an edge for each sender earlier than its receiver (a head feeds
    its own block's MLP, an MLP only later blocks), and every edge of the graph without MLP
    nodes keeps its score."""
    model = lm()
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True)
    heads = [[f"L{i}.H{h}" for h in range(4)] for i in range(2)]
    assert edges.upstream == ["embed", *heads[0], "L0.MLP", *heads[1], "L1.MLP"]
    readers = [[f"L{i}.H{h}.{p}" for p in "qkv" for h in range(4)] for i in range(2)]
    assert edges.downstream == [*readers[0], "L0.MLP.in", *readers[1], "L1.MLP.in", "logits"]
    stage = {"embed": 0, "L0.H": 1, "L0.MLP": 2, "L1.H": 3, "L1.MLP": 4, "logits": 5}

    def where(name: str) -> int:
        return next(v for k, v in sorted(stage.items(), key=lambda kv: -len(kv[0]))
                    if name.startswith(k))
    for u, sender in enumerate(edges.upstream):
        for v, receiver in enumerate(edges.downstream):
            exists = where(sender) < where(receiver)
            assert bool(edges.valid[u, v]) == exists, (sender, receiver)
            if not exists:
                assert edges.scores[u, v] == 0
    assert edges.scores[edges.valid].abs().min() > 0
    plain = at.edge_attribution_patching(model, clean, corrupted, metric)
    rows = [edges.upstream.index(n) for n in plain.upstream]
    cols = [edges.downstream.index(n) for n in plain.downstream]
    assert torch.equal(edges.scores[rows][:, cols], plain.scores)
    assert torch.equal(edges.valid[rows][:, cols], plain.valid)
    same = at.edge_attribution_patching(model, clean, clean, metric, mlps=True)
    assert torch.equal(same.scores, torch.zeros_like(same.scores))


def test_attention_only_models_have_no_mlp_nodes():
    model = lm(mlp_ratio=0)
    clean, corrupted, metric = inputs()
    with_nodes = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True)
    without = at.edge_attribution_patching(model, clean, corrupted, metric)
    assert with_nodes.upstream == without.upstream and not any(
        "MLP" in n for n in with_nodes.upstream + with_nodes.downstream)
    assert torch.equal(with_nodes.scores, without.scores)


def test_a_parallel_block_and_bad_arguments_are_refused():
    """A block whose MLP reads the residual before the attention (x + attn(norm1(x)) +
    mlp(norm2(x)), GPT-NeoX's parallel residual) breaks the graph: refused, naming it."""
    model = lm(depth=1)
    clean, corrupted, metric = inputs()
    with pytest.raises(ValueError, match="mlps must be True or False"):
        at.edge_attribution_patching(model, clean, corrupted, metric, mlps="yes")

    def parallel(self, x, mask=None, state=None):
        return x + self.attn(self.norm1(x), mask=mask) + self.mlp(self.norm2(x))
    model.blocks[0].forward = types.MethodType(parallel, model.blocks[0])
    at.edge_attribution_patching(model, clean, corrupted, metric)  # no MLP node: it runs
    with pytest.raises(ValueError, match="does not read the residual after the block's"):
        at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True)


@pytest.mark.slow
def test_integrated_gradients_with_mlp_nodes():
    """steps=1 is plain EAP bit for bit; with steps=3 each MLP moves as a writer group of its
    own, and the edges out of each sender add up to its AtP-IG score (attribution_patching
    with steps=3 moves the same piece along the same line)."""
    model = lm()
    clean, corrupted, metric = inputs()
    plain = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True)
    one = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True, steps=1)
    assert torch.equal(plain.scores, one.scores)
    ig = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True, steps=3)
    assert_close(ig.scores.sum(1), atp_per_sender(model, clean, corrupted, metric, "noise",
                                                  steps=3))
    assert not torch.allclose(ig.scores, plain.scores)


@pytest.mark.slow
def test_eap_ig_of_the_last_mlp_into_the_logits_tends_to_direct_patching():
    """The last block's MLP feeds only the final norm: moving it along its line is patching
    that one edge, so EAP-IG's score of L0.MLP -> logits (one block) is the left Riemann sum
    of the integral that equals direct edge patching, through the nonlinear final LayerNorm;
    its error falls like 1 / m (4x from m = 2 to 8; asked: more than 3x)."""
    model = lm(depth=1)
    clean, corrupted, metric = inputs()
    edge = [(("mlp", 0), "logits")]
    want = float(by_hand(model, Parts(model, "lm"), clean, corrupted, metric, edge, "noise",
                         False)[0])
    errors = [abs(at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True,
                                               steps=m).score("L0.MLP", "logits") - want)
              for m in (2, 8)]
    assert errors[1] < errors[0] / 3
    assert errors[0] > 1e-3


# ----------------------------------------------------------------- Hugging Face


def hf_model(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers",
                                       reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.integrations import hf

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4,
                                         n_positions=16, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16,
                                          intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
    return hf.use_attnlab(model.eval())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_mlp_edges_against_direct_patching_and_atp(kind):
    """Tiny GPT-2 and Llama (GQA) from their configs, MLPs at work: every edge into an MLP or
    the logits is the derivative of direct edge patching (hooks on ln_2 /
    post_attention_layernorm and the final norm, written here), and the edges out of every
    sender add up to its AtP score."""
    model = hf_model(kind)
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, mlps=True)
    assert "L0.MLP" in edges.upstream and "L1.MLP.in" in edges.downstream
    senders = ["embed", (0, 1), (0, 3), ("mlp", 0), (1, 2), ("mlp", 1)]
    pairs = [(u, v) for u in senders for v in (("mlp", 0), ("mlp", 1), "logits")
             if edges.valid[edges.upstream.index(sender_name(u)),
                            edges.downstream.index(receiver_name(v))]]
    assert len(pairs) == 14
    want = by_hand(model, Parts(model, kind), clean, corrupted, metric, pairs, "noise", True)
    assert_close(scores_of(edges, pairs), want)
    assert want.abs().min() > 1e-5
    assert_close(edges.scores.sum(1), atp_per_sender(model, clean, corrupted, metric,
                                                     "noise"))


@pytest.mark.slow
def test_post_norm_models_are_refused():
    """BERT adds each sublayer to the residual and then normalises it: its residual is not a
    sum of what the nodes write, so EAP refuses it (before running it)."""
    transformers = pytest.importorskip("transformers",
                                       reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.integrations import hf

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=32)
    model = hf.use_attnlab(transformers.BertModel(config).eval())
    clean, corrupted, metric = inputs()
    for mlps in (False, True):
        with pytest.raises(ValueError, match="post-norm blocks"):
            at.edge_attribution_patching(model, clean, corrupted, metric, mlps=mlps)
