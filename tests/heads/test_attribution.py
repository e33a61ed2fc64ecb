"""Attribution patching (AtP) and edge attribution patching (EAP) against patching done by
hand in this file: a hook that moves one head's (or edge's) value toward the other run by a
factor t. At t = 1 that is real patching; its derivative at t = 0 is exactly what AtP / EAP
estimate, so on any model they must equal it to rounding, and where the metric is linear in
the piece they must equal real patching itself."""

import pytest
import torch
from torch import Tensor, nn

from attnlab.heads import attribution as at
from attnlab.heads.metrics import logit_difference, run_model
from attnlab.heads.sites import sites
from attnlab.models.transformer_lm import TransformerLM
from tests.tolerances import assert_close

VOCAB, BATCH, LENGTH = 23, 3, 7
HEAD_DIM = {"q": 1, "k": 1, "v": 1, "weights": 1, "heads": 2}
POSITION_DIM = {"q": 2, "k": 2, "v": 2, "weights": 2, "heads": 1}


def lm(depth: int, *, linear: bool = False, mlp: bool = True, seed: int = 0) -> nn.Module:
    """A tiny TransformerLM; ``linear``: no norms (block inputs and the final residual go to
    the projections as they are); ``mlp=False``: each MLP's output layer is zero, so the MLPs
    add nothing and read nothing that matters."""
    torch.manual_seed(seed)
    # without norms, embeddings of N(0, 1) (not 0.1) keep the logits O(1)
    model = TransformerLM(VOCAB, dim=16, depth=depth, heads=4, max_len=16,
                          embed_std=1.0 if linear else 0.1).eval()
    if linear:
        for block in model.blocks:
            block.norm1 = nn.Identity()
        model.norm = nn.Identity()
    if not mlp:
        with torch.no_grad():
            for block in model.blocks:
                block.mlp[2].weight.zero_()
                block.mlp[2].bias.zero_()
    return model


def inputs(seed: int = 1) -> tuple[Tensor, Tensor, object]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    corrupted = clean.clone()
    changed = [0, 1, 2, 3, LENGTH - 1]  # the last too: the embeddings reach the logits there
    corrupted[:, changed] = torch.randint(0, VOCAB, (BATCH, len(changed)), generator=g)
    correct = torch.randint(0, VOCAB, (BATCH,), generator=g)
    wrong = (correct + 1 + torch.randint(0, VOCAB - 1, (BATCH,), generator=g)) % VOCAB
    return clean, corrupted, logit_difference(correct, wrong)


def bases(clean, corrupted, direction):
    return (corrupted, clean) if direction == "denoise" else (clean, corrupted)


# --------------------------------------------------------------- patching by hand


def value_at(model, x, layer, point):
    site = sites(model)[layer]
    seen = {}
    handle = site.hook(point).register_forward_hook(lambda m, a, out: seen.update(v=out))
    try:
        with torch.no_grad():
            run_model(model, x)
    finally:
        handle.remove()
    return seen["v"].detach()


def patched_metric(model, base, target_value, metric, layer, point, t, per_position):
    """metric of the base run with ``L<layer>.<point>`` moved toward ``target_value``: head h
    (at position p) by the factor ``t[h]`` (``t[h, p]``), the other entries not at all."""
    site = sites(model)[layer]
    head, pos = HEAD_DIM[point], POSITION_DIM[point]

    def hook(module, args, out):
        shape = [1] * out.dim()
        shape[head] = out.shape[head]
        factor = t
        if per_position:
            shape[pos] = out.shape[pos]
            factor = t if head < pos else t.T
        return out + factor.reshape(shape) * (target_value - out)

    handle = site.hook(point).register_forward_hook(hook)
    try:
        return metric(run_model(model, base))
    finally:
        handle.remove()


def by_hand(model, clean, corrupted, metric, point, direction, per_position, derivative):
    """(layers, heads[, positions]): real patching, one forward per head (and position), or
    (``derivative``) d metric / d t at t = 0, every head's factor t_h in one backward pass."""
    base, target = bases(clean, corrupted, direction)
    with torch.no_grad():
        unpatched = metric(run_model(model, base))
    rows = []
    for s in sites(model):
        value = value_at(model, target, s.layer, point)
        heads = value.shape[HEAD_DIM[point]]
        shape = (heads, value.shape[POSITION_DIM[point]]) if per_position else (heads,)
        if derivative:
            t = torch.zeros(shape, requires_grad=True)
            m = patched_metric(model, base, value, metric, s.layer, point, t, per_position)
            rows.append(torch.autograd.grad(m, t)[0])
            continue
        row = torch.zeros(shape)
        for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(
                -1, len(shape)):
            one = torch.zeros(shape)
            one[tuple(index)] = 1
            with torch.no_grad():
                row[tuple(index)] = patched_metric(model, base, value, metric, s.layer, point,
                                                   one, per_position) - unpatched
        rows.append(row)
    return torch.stack(rows)


def residual_module(model, block, point):
    """(module, hook kind) of a TransformerLM residual point, found here by hand."""
    b = model.blocks[block]
    return {"resid_pre": (b, "pre"), "attn_out": (b.attn, "out"), "mlp_out": (b.mlp, "out"),
            "resid_post": (b, "out")}[point]


def residual_by_hand(model, clean, corrupted, metric, point, direction, per_position,
                     derivative):
    """(blocks[, positions]): a residual point of each block moved toward the other run, by
    real patching or (``derivative``) d/dt at t = 0, through hooks written here."""
    base, target = bases(clean, corrupted, direction)
    with torch.no_grad():
        unpatched = metric(model(base))
    rows = []
    for i in range(len(model.blocks)):
        module, kind = residual_module(model, i, point)
        seen = {}
        if kind == "pre":
            grab = module.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(v=a[0]))
        else:
            grab = module.register_forward_hook(
                lambda m, a, out, seen=seen: seen.update(v=out))
        with torch.no_grad():
            model(target)
        grab.remove()
        value = seen["v"]

        def run(t, value=value, module=module, kind=kind):
            factor = t.reshape(1, -1, 1) if per_position else t
            if kind == "pre":
                handle = module.register_forward_pre_hook(
                    lambda m, a: (a[0] + factor * (value - a[0]), *a[1:]))
            else:
                handle = module.register_forward_hook(
                    lambda m, a, out: out + factor * (value - out))
            try:
                return metric(model(base))
            finally:
                handle.remove()
        shape = (LENGTH,) if per_position else ()
        if derivative:
            t = torch.zeros(shape, requires_grad=True)
            rows.append(torch.autograd.grad(run(t), t)[0])
            continue
        row = torch.zeros(shape)
        for index in ([(j,) for j in range(LENGTH)] if per_position else [()]):
            one = torch.zeros(shape)
            one[index] = 1
            with torch.no_grad():
                row[index] = run(one) - unpatched
        rows.append(row)
    return torch.stack(rows)


def caches(model, x):
    """The residual entering each block and each layer's hook_heads value (TransformerLM)."""
    resid, heads, handles = {}, {}, []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, i=i: resid.__setitem__(i, a[0].detach())))
        handles.append(block.attn.hook_heads.register_forward_hook(
            lambda m, a, out, i=i: heads.__setitem__(i, out.detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return resid, heads


def edge_patched_metric(model, base, base_cache, target_cache, metric, upstream, downstream,
                        t):
    """metric of the base run with the edge upstream -> downstream patched by a factor t:
    only the downstream input (one head's q, k or v, or the logits' residual) sees
    t (out_u(target) - out_u(base)) added to the residual it reads; everything else runs as
    in the base run (TransformerLM, written independently of attnlab.heads.attribution)."""
    (base_resid, base_heads), (target_resid, target_heads) = base_cache, target_cache
    if upstream == "embed":
        delta = target_resid[0] - base_resid[0]
    else:
        layer, head = upstream
        dz = torch.zeros_like(base_heads[layer])
        dz[:, :, head] = target_heads[layer][:, :, head] - base_heads[layer][:, :, head]
        delta = dz.flatten(2) @ model.blocks[layer].attn.o_proj.weight.T
    delta = t * delta
    if downstream == "logits":
        handle = model.norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,))
    else:
        layer, head, point = downstream
        block = model.blocks[layer]
        seen = {}
        probe = getattr(block.attn, f"hook_{point}")
        grab = probe.register_forward_hook(lambda m, a, out: seen.update(v=out))
        try:
            block.attn(block.norm1(base_resid[layer] + delta))
        finally:
            grab.remove()
        new = seen["v"]

        def replace(m, a, out):
            mask = torch.zeros_like(out)
            mask[:, head] = 1
            return out + mask * (new - out)
        handle = probe.register_forward_hook(replace)
    try:
        return metric(model(base))
    finally:
        handle.remove()


def edges_by_hand(model, clean, corrupted, metric, edges, direction, derivative):
    """Each edge (upstream, downstream) patched by hand: real edge patching, or
    (``derivative``) d metric / d t at t = 0."""
    base, target = bases(clean, corrupted, direction)
    base_cache, target_cache = caches(model, base), caches(model, target)
    with torch.no_grad():
        unpatched = metric(model(base))
    scores = []
    for upstream, downstream in edges:
        args = (model, base, base_cache, target_cache, metric, upstream, downstream)
        if derivative:
            t = torch.zeros((), requires_grad=True)
            scores.append(torch.autograd.grad(edge_patched_metric(*args, t), t)[0])
        else:
            with torch.no_grad():
                scores.append(edge_patched_metric(*args, 1.0) - unpatched)
    return torch.stack(scores)


def node(upstream):
    return "embed" if upstream == "embed" else f"L{upstream[0]}.H{upstream[1]}"


def reader(downstream):
    return "logits" if downstream == "logits" else \
        f"L{downstream[0]}.H{downstream[1]}.{downstream[2]}"


# ------------------------------------------------------------------------- AtP


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_is_the_derivative_of_patching_on_a_nonlinear_model(direction):
    """Two layers with norms and MLPs: every point's AtP score is d/dt metric(piece moved by
    t toward the other run) at t = 0, computed here through a different hook."""
    model = lm(2)
    clean, corrupted, metric = inputs()
    for point in ("heads", "q", "k", "v", "weights"):
        got = at.attribution_patching(model, clean, corrupted, metric, point=point,
                                      direction=direction)
        want = by_hand(model, clean, corrupted, metric, point, direction, False, True)
        assert got.axes == ("layer", "head") and got.method == "attribution"
        assert_close(got.scores, want, msg=point)
    for point in at.RESIDUAL_POINTS:
        got = at.attribution_patching(model, clean, corrupted, metric, point=point,
                                      direction=direction, per_position=point == "resid_pre")
        want = residual_by_hand(model, clean, corrupted, metric, point, direction,
                                point == "resid_pre", True)
        assert got.axes == (("layer", "position") if point == "resid_pre" else ("layer",))
        assert_close(got.scores, want, msg=point)
    got = at.attribution_patching(model, clean, corrupted, metric, point="heads",
                                  direction=direction, per_position=True)
    assert got.axes == ("layer", "head", "position")
    assert_close(got.scores, by_hand(model, clean, corrupted, metric, "heads", direction,
                                     True, True))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_equals_real_patching_where_the_metric_is_linear(direction):
    """One layer, no norms, MLPs that add nothing: the logits are linear in hook_heads, in
    hook_v and in hook_weights (weights @ v), so AtP is real patching, to rounding."""
    model = lm(1, linear=True, mlp=False)
    clean, corrupted, metric = inputs()
    for point, per_position in (("heads", False), ("heads", True), ("v", False),
                                ("weights", False)):
        if True:
            got = at.attribution_patching(model, clean, corrupted, metric, point=point,
                                          direction=direction, per_position=per_position)
            want = by_hand(model, clean, corrupted, metric, point, direction, per_position,
                           False)
            assert_close(got.scores, want, msg=f"{point}, per_position={per_position}")
            assert got.scores.abs().max() > 1e-3  # the check is not vacuous
    for point in ("attn_out", "resid_post"):  # the logits are linear in these too
        got = at.attribution_patching(model, clean, corrupted, metric, point=point,
                                      direction=direction, per_position=True)
        assert_close(got.scores, residual_by_hand(model, clean, corrupted, metric, point,
                                                  direction, True, False), msg=point)


def test_atp_has_activation_patchings_axes_sign_and_values_where_linear():
    """Entry by entry against heads.patching.activation_patching, head and residual points."""
    from attnlab.heads.patching import activation_patching

    model = lm(1, linear=True, mlp=False)
    clean, corrupted, metric = inputs()
    for point, per_position, direction in (("heads", True, "denoise"), ("v", False, "noise"),
                                           ("resid_post", True, "noise")):
        got = at.attribution_patching(model, clean, corrupted, metric, point=point,
                                      per_position=per_position, direction=direction)
        want = activation_patching(model, clean, corrupted, metric, point=point,
                                   per_position=per_position, direction=direction)
        assert (got.axes, got.point, got.direction) == (want.axes, want.point, want.direction)
        assert (got.clean, got.corrupted) == pytest.approx((want.clean, want.corrupted))
        assert_close(got.scores, want.scores.to(got.scores.dtype), msg=point)


def test_atp_metric_values_and_zero_on_equal_inputs():
    model = lm(2)
    clean, corrupted, metric = inputs()
    with torch.no_grad():
        m_clean, m_corrupted = float(metric(model(clean))), float(metric(model(corrupted)))
    for direction in ("denoise", "noise"):
        s = at.attribution_patching(model, clean, corrupted, metric, direction=direction)
        assert (s.clean, s.corrupted) == pytest.approx((m_clean, m_corrupted))
        assert s.direction == direction
    for point in ("heads", "q", "k", "v", "weights"):
        s = at.attribution_patching(model, clean, clean, metric, point=point,
                                    per_position=True)
        assert s.scores.shape[:2] == (2, 4) and s.scores.shape[2] == LENGTH
        assert torch.equal(s.scores, torch.zeros_like(s.scores))


# ------------------------------------------------------------------------- EAP

EDGES = [("embed", (0, 1, "q")), ("embed", (0, 2, "k")), ("embed", (1, 3, "v")),
         ((0, 0), (1, 2, "q")), ((0, 3), (1, 1, "k")), ((0, 2), (1, 2, "v")),
         ((0, 1), "logits"), ((1, 3), "logits"), ("embed", "logits")]


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_eap_is_the_derivative_of_edge_patching(direction):
    """Two layers with norms and MLPs: each edge's EAP score is d/dt metric(edge patched by
    t) at t = 0, the edge patched by hand: only that head's q, k or v input (or the logits'
    residual) sees the upstream node's change."""
    model = lm(2)
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, direction=direction)
    got = torch.tensor([edges.score(node(u), reader(v)) for u, v in EDGES])
    want = edges_by_hand(model, clean, corrupted, metric, EDGES, direction, True)
    assert_close(got, want)
    assert want.abs().min() > 1e-4  # every edge checked matters


def test_eap_equals_edge_patching_where_it_is_linear():
    """Two layers without norms, MLPs adding nothing: a value input and the logits are
    linear in the residual they read, and the output linear in v, so EAP on the edges into
    layer 1's values and into the logits is real edge patching."""
    model = lm(2, linear=True, mlp=False)
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric)
    checked = [(u, (1, h, "v")) for u in ("embed", (0, 0), (0, 3)) for h in range(4)] + \
        [(u, "logits") for u in ("embed", (0, 1), (1, 0), (1, 2))]
    got = torch.tensor([edges.score(node(u), reader(v)) for u, v in checked])
    want = edges_by_hand(model, clean, corrupted, metric, checked, "noise", False)
    assert_close(got, want)
    assert want.abs().max() > 1e-3


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_eap_edges_out_of_a_head_add_up_to_its_atp(direction):
    """With norms but MLPs that add nothing, the residual stream is read only by later heads'
    q, k, v and by the logits: the edges out of a head add up to its AtP score, and the edges
    of the last layer's heads into the logits are their AtP scores."""
    model = lm(2, mlp=False)
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, direction=direction)
    atp = at.attribution_patching(model, clean, corrupted, metric, direction=direction)
    out_of_heads = edges.scores[1:].sum(1).reshape(2, 4)
    assert_close(out_of_heads, atp.scores)
    into_logits = edges.scores[:, edges.downstream.index("logits")]
    assert_close(into_logits[5:], atp.scores[1])
    assert (edges.clean, edges.corrupted) == pytest.approx((atp.clean, atp.corrupted))


def test_eap_edges_only_point_forward_and_vanish_on_equal_inputs():
    model = lm(2)
    clean, corrupted, metric = inputs()
    edges = at.edge_attribution_patching(model, clean, corrupted, metric)
    assert edges.upstream == ["embed"] + [f"L{i}.H{h}" for i in range(2) for h in range(4)]
    assert edges.downstream == [f"L{i}.H{h}.{p}" for i in range(2) for p in "qkv"
                                for h in range(4)] + ["logits"]
    for u, name in enumerate(edges.upstream):
        for v, target in enumerate(edges.downstream):
            forward = name == "embed" or target == "logits" or \
                int(name[1]) < int(target[1])
            assert bool(edges.valid[u, v]) == forward, (name, target)
            if not forward:
                assert edges.scores[u, v] == 0
    assert edges.scores[edges.valid].abs().min() > 0
    for u, v, score in edges.top(50):
        assert edges.valid[edges.upstream.index(u), edges.downstream.index(v)]
        assert score == edges.score(u, v)
    same = at.edge_attribution_patching(model, clean, clean, metric)
    assert torch.equal(same.scores, torch.zeros_like(same.scores))


# ----------------------------------------------------------------- Hugging Face


def gpt2(layers: int, *, linear: bool = False):
    transformers = pytest.importorskip("transformers",
                                       reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.integrations import hf

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=4,
                                     n_positions=16, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    if linear:
        model.transformer.ln_f = nn.Identity()
    return hf.use_attnlab(model)


def test_gpt2_atp_equals_patching_when_linear_and_eap_adds_up():
    clean, corrupted, metric = inputs()
    model = gpt2(1, linear=True)
    got = at.attribution_patching(model, {"input_ids": clean}, {"input_ids": corrupted}, metric)
    assert_close(got.scores, by_hand(model, clean, corrupted, metric, "heads", "denoise",
                                     False, False))
    model = gpt2(2)
    edges = at.edge_attribution_patching(model, clean, corrupted, metric)
    atp = at.attribution_patching(model, clean, corrupted, metric, direction="noise")
    assert_close(edges.scores[1:].sum(1).reshape(2, 4), atp.scores)
    assert atp.scores.abs().max() > 1e-4


def test_llama_gqa_counts_kv_heads_and_eap_adds_up():
    """Llama with 4 query and 2 key/value heads (MLPs adding nothing): k, v scores and EAP's
    k, v readers count the kv heads, and the edges out of a head add up to its AtP."""
    transformers = pytest.importorskip("transformers",
                                       reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.integrations import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    hf.use_attnlab(model)
    clean, corrupted, metric = inputs()
    assert at.attribution_patching(model, clean, corrupted, metric, point="k").scores.shape \
        == (2, 2)
    edges = at.edge_attribution_patching(model, clean, corrupted, metric)
    assert edges.downstream[:8] == ["L0.H0.q", "L0.H1.q", "L0.H2.q", "L0.H3.q", "L0.H0.k",
                                    "L0.H1.k", "L0.H0.v", "L0.H1.v"]
    atp = at.attribution_patching(model, clean, corrupted, metric, direction="noise")
    assert_close(edges.scores[1:].sum(1).reshape(2, 4), atp.scores)
    assert atp.scores.abs().max() > 1e-4


# ----------------------------------------------------------------- errors, agreement


def test_bad_input_is_refused_clearly():
    model = lm(1)
    clean, corrupted, metric = inputs()
    with pytest.raises(ValueError, match="unknown point 'resid': head points are q, k"):
        at.attribution_patching(model, clean, corrupted, metric, point="resid")
    with pytest.raises(ValueError, match="direction must be"):
        at.attribution_patching(model, clean, corrupted, metric, direction="both")
    with pytest.raises(ValueError, match="direction must be"):
        at.edge_attribution_patching(model, clean, corrupted, metric, direction="up")
    with pytest.raises(ValueError, match="same batch size and length"):
        at.attribution_patching(model, clean, corrupted[:, :5], metric)
    with pytest.raises(ValueError, match="same batch size and length"):
        at.edge_attribution_patching(model, clean, corrupted[:2], logit_difference(3, 5))
    with pytest.raises(ValueError, match="one number"):
        at.attribution_patching(model, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match="without a gradient"):
        at.attribution_patching(model, clean, corrupted,
                                lambda logits: metric(logits).detach())
    edges = at.edge_attribution_patching(model, clean, corrupted, metric)
    with pytest.raises(ValueError, match="did you mean L0.H1.q"):
        edges.score("L0.H1", "L0.H1.qq")


def test_agreement_ranks_and_overlap():
    a = torch.tensor([[0.1, -5.0, 2.0], [3.0, float("nan"), 0.0]])
    b = torch.tensor([[0.2, -4.0, 1.0], [3.5, 1.0, 0.3]])
    got = at.agreement(a, b, k=2)
    assert got.entries == 5 and got.k == 2
    assert got.top_k_overlap == 1.0  # both: -5 / -4 and 3 / 3.5
    assert got.spearman == pytest.approx(0.9)  # ranks 3 1 4 5 2 against 2 1 4 5 3
    assert at.agreement(a, -b, k=2).spearman == pytest.approx(-0.9)
    with pytest.raises(ValueError, match="shapes differ"):
        at.agreement(a, b[:1])


# ------------------------------------------------------------- a trained induction model


def induction_pair(batch: int = 32, seed: int = 1):
    """clean: filler, an 8-token segment at positions 3..10, filler, the segment again from
    position 24 up to its 5th token (the last position, 28), whose answer is the segment's
    6th token B; corrupted: B replaced at its first occurrence (position 8) by a filler token
    C. Metric: logit(B) - logit(C) at the last position. Vocabulary 64 (the task's)."""
    g = torch.Generator().manual_seed(seed)
    m, first, second, j = 8, 3, 24, 4
    order = torch.rand(batch, 62, generator=g).argsort(-1) + 2
    seg, rest = order[:, :m], order[:, m:]
    clean = rest.gather(1, torch.randint(0, rest.shape[1], (batch, second + j + 1),
                                         generator=g))
    clean[:, first:first + m] = seg
    clean[:, second:second + j + 1] = seg[:, :j + 1]
    corrupted = clean.clone()
    corrupted[:, first + j + 1] = rest[:, -1]
    return clean, corrupted, logit_difference(seg[:, j + 1], rest[:, -1])


@pytest.mark.slow
def test_atp_and_eap_rank_like_patching_on_a_trained_induction_model():
    """A 2-layer attention-only TransformerLM trained on the arena's induction task (600
    steps); AtP against activation patching per head and per (head, position), EAP against
    edge patching by hand. The floors are loose (the measured values, in the docs'
    attribution section, are 0.96-1.0 for heads and 0.75 for edges): they fail when the
    estimates stop ranking like patching, not on the run-to-run spread."""
    from attnlab.heads.patching import activation_patching
    from attnlab.tasks import make_task

    torch.manual_seed(0)
    task = make_task("induction")
    model = task.build_model("softmax", {}, dim=64, depth=2, heads=4, mlp_ratio=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss = task.loss(model, task.train_batch(64, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert task.evaluate(model).metrics["accuracy"] > 0.9
    clean, corrupted, metric = induction_pair()
    for per_position in (False, True):
        est = at.attribution_patching(model, clean, corrupted, metric,
                                      per_position=per_position)
        ref = activation_patching(model, clean, corrupted, metric, per_position=per_position)
        got = at.agreement(est, ref, k=3 if not per_position else 10)
        print(f"AtP heads{' x position' if per_position else ''}: {got}")
        assert got.spearman > 0.8 and got.top_k_overlap >= 2 / 3
    edges = at.edge_attribution_patching(model, clean, corrupted, metric)
    pairs = [(u, v) for ui, u in enumerate(edges.upstream)
             for vi, v in enumerate(edges.downstream) if edges.valid[ui, vi]]
    as_hand = [("embed" if u == "embed" else (int(u[1]), int(u[4])),
                "logits" if v == "logits" else (int(v[1]), int(v[4]), v[6])) for u, v in pairs]
    real = edges_by_hand(model, clean, corrupted, metric, as_hand, "noise", False)
    got = at.agreement(torch.tensor([edges.score(u, v) for u, v in pairs]), real, k=10)
    print(f"EAP edges: {got}")
    assert got.spearman > 0.5 and got.top_k_overlap >= 0.7


# ------------------------------------------------------- integrated gradients (steps)


def test_ig_with_one_step_is_atp_bit_for_bit():
    model = lm(2)
    clean, corrupted, metric = inputs()
    for point in ("heads", "k", "attn_out"):
        plain = at.attribution_patching(model, clean, corrupted, metric, point=point)
        one = at.attribution_patching(model, clean, corrupted, metric, point=point, steps=1)
        assert torch.equal(plain.scores, one.scores) and one.method == "attribution"


def test_ig_two_steps_average_the_slopes_at_the_base_and_halfway():
    """steps=2: the mean of d/dt metric at t = 0 and at t = 1/2, where t moves every head of
    the layer together toward the other run (the layer's other pieces as well), by hand."""
    model = lm(2)
    clean, corrupted, metric = inputs()
    base, target = bases(clean, corrupted, "noise")
    got = at.attribution_patching(model, clean, corrupted, metric, point="heads",
                                  direction="noise", steps=2)
    assert got.method == "attribution (integrated gradients, 2 steps)"
    for layer in range(2):
        value = value_at(model, target, layer, "heads")
        slopes = []
        for start in (0.0, 0.5):
            t = torch.full((4,), start, requires_grad=True)
            m = patched_metric(model, base, value, metric, layer, "heads", t, False)
            slopes.append(torch.autograd.grad(m, t)[0])
        assert_close(got.scores[layer], (slopes[0] + slopes[1]) / 2, msg=f"layer {layer}")


@pytest.mark.parametrize("direction", ["denoise", pytest.param("noise", marks=pytest.mark.slow)])
def test_ig_of_one_piece_converges_to_real_patching(direction):
    """A residual point without positions is one piece per layer, interpolated alone: its
    integrated-gradients score tends to activation patching's (the left Riemann sum's error
    falls like 1/steps) on a nonlinear model where AtP is far off."""
    from attnlab.heads.patching import activation_patching

    model = lm(2)
    clean, corrupted, metric = inputs()
    want = activation_patching(model, clean, corrupted, metric, point="attn_out",
                               direction=direction).scores
    errors = []
    for steps in (1, 4, 16):
        got = at.attribution_patching(model, clean, corrupted, metric, point="attn_out",
                                      direction=direction, steps=steps).scores
        errors.append(float((got - want.to(got.dtype)).abs().max()))
    assert errors[0] > 0.1 * float(want.abs().max())  # AtP is not already right here
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2.5, errors


def test_ig_is_exact_at_any_steps_where_the_metric_is_linear():
    model = lm(1, linear=True, mlp=False)
    clean, corrupted, metric = inputs()
    got = at.attribution_patching(model, clean, corrupted, metric, point="heads",
                                  per_position=True, direction="noise", steps=3)
    assert_close(got.scores, by_hand(model, clean, corrupted, metric, "heads", "noise", True,
                                     False))


def test_ig_steps_must_be_a_positive_integer():
    model = lm(1)
    clean, corrupted, metric = inputs()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            at.attribution_patching(model, clean, corrupted, metric, steps=bad)


def test_eap_ig_edges_out_of_a_writer_add_up_to_its_atp_ig():
    """Attention only in effect (MLPs that add nothing): with integrated gradients too, the
    edges out of a head add up to its AtP-IG score (the same line: its layer's hook_heads),
    the edges out of the embeddings to AtP-IG of block 0's resid_pre; steps=1 is EAP."""
    model = lm(2, mlp=False)
    clean, corrupted, metric = inputs()
    plain = at.edge_attribution_patching(model, clean, corrupted, metric)
    assert torch.equal(plain.scores, at.edge_attribution_patching(
        model, clean, corrupted, metric, steps=1).scores)
    edges = at.edge_attribution_patching(model, clean, corrupted, metric, steps=2)
    atp = at.attribution_patching(model, clean, corrupted, metric, direction="noise", steps=2)
    assert_close(edges.scores[1:].sum(1).reshape(2, 4), atp.scores)
    embed = at.attribution_patching(model, clean, corrupted, metric, point="resid_pre",
                                    direction="noise", steps=2)
    assert_close(edges.scores[0].sum(), embed.scores[0])
    assert not torch.allclose(edges.scores, plain.scores)  # the steps changed something
