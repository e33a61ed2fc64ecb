"""The catalogue's checks (docs/mechanisms/) for the head-mixing and projection
mechanisms: moh, cca, gaam, rcmha, medusa, mil_attention."""

import math

import pytest
import torch

import attnlab as al
from attnlab.mechanisms.gaam import gaussian_weights

DIM = 32


def build(name, heads=4, **kw):
    torch.manual_seed(0)
    return al.build(name, dim=DIM, heads=heads, **kw).eval()


# -------------------------------------------------------------------------------------- moh
def test_moh_gates_exactly_shared_plus_k_heads_per_token():
    attn = build("moh", heads=8, shared_heads=2, top_k=3)
    g = attn.gates(torch.randn(2, 11, DIM))
    assert ((g != 0).sum(-1) == 5).all()
    assert (g[..., :2] != 0).all()  # the shared heads are always on


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tile", [None, 2])  # one tile of packed rows, or several
def test_moh_inference_computes_only_selected_heads_and_equals_the_dense_path(causal, tile):
    attn = build("moh", heads=8, shared_heads=2, top_k=3, causal=causal)
    attn.rows_per_tile = tile
    x = torch.randn(2, 11, DIM)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, :3] = False
    y = attn(x, mask=keep)
    assert attn.rows_computed == 2 * 11 * 5  # (shared + k) rows per token, not H
    attn.train()
    dense = attn(x, mask=keep)
    assert attn.rows_computed == 2 * 11 * 8
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


def test_moh_inference_never_builds_an_l_by_l_mask():
    from attnlab.ops.tiled import TILE_ELEMENTS
    from tests.ops.cases import MaxNumel

    attn = build("moh", heads=4, shared_heads=1, top_k=1, causal=True)
    length = 4096
    x = torch.randn(1, length, DIM)
    with torch.no_grad(), MaxNumel() as probe:
        attn(x)
    assert probe.largest <= TILE_ELEMENTS < length * length


def test_moh_load_balance_loss_is_the_formula_and_trains_the_router():
    attn = build("moh", heads=8, shared_heads=2, top_k=3).train()
    x = torch.randn(2, 11, DIM)
    attn(x)
    p = torch.softmax(attn.router(x), -1)
    chosen = torch.zeros_like(p).scatter_(-1, p.topk(3, -1).indices, 1.0)
    expected = 0.01 * 6 * (p.mean((0, 1)) * chosen.mean((0, 1))).sum()
    torch.testing.assert_close(attn.extra_loss(), expected)
    attn.extra_loss().backward()
    assert attn.router.weight.grad.abs().sum() > 0
    attn.eval()
    attn(x)
    assert attn.extra_loss() == 0


# -------------------------------------------------------------------------------------- cca
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cca_cache_holds_two_latents_per_kv_head_and_decodes_like_the_full_forward(kv_heads):
    attn = build("cca", kv_heads=kv_heads, causal=True)
    x = torch.randn(2, 12, DIM)
    full = attn(x)
    state = attn.new_state(2)
    parts = [attn(x[:, :5], state=state)] + [attn(x[:, t:t + 1], state=state)
                                             for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert state.numbers_per_token("k", "v") == 2 * kv_heads * attn.head_dim
    assert attn.head_dim * attn.heads * attn.compression == DIM  # the latent is compressed


def test_cca_queries_and_keys_have_norm_sqrt_dh_times_the_key_temperature():
    attn = build("cca", causal=True)
    with torch.no_grad():
        attn.qkv.key_temperature.fill_(2.0)
    seen = {}
    attn.hook_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.hook_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    attn(torch.randn(1, 7, DIM))
    root = math.sqrt(attn.head_dim)
    torch.testing.assert_close(seen["q"].norm(dim=-1), torch.full((1, 4, 7), root))
    torch.testing.assert_close(seen["k"].norm(dim=-1), torch.full((1, 4, 7), 2 * root))


# ------------------------------------------------------------------------------------- gaam
def test_gaam_weights_sum_to_one_and_ignore_affine_rescaling():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 5, dtype=torch.float64)
    offset, scale = torch.zeros(3, 4), torch.rand(3, 4) + 0.5
    w = gaussian_weights(x, offset, scale, eps=1e-12)
    torch.testing.assert_close(w.sum(2), torch.ones(2, 3, 5, dtype=torch.float64))
    w2 = gaussian_weights(3.5 * x - 2.0, offset, scale, eps=1e-12)
    torch.testing.assert_close(w2, w, atol=1e-6, rtol=1e-5)
    wide = gaussian_weights(x, offset, torch.full((3, 4), 1e6))
    torch.testing.assert_close(wide, torch.full_like(wide, 0.1))


def test_gaam_weights_match_the_gaussian_product_written_out():
    """M_n = prod_g N(y_g) / sum_n' prod_g N(y_g), y_g = (x - mu - delta_g) / sigma, per channel,
    with non-zero offsets, computed one channel and one token at a time; sigma^2 is the
    unbiased variance (N - 1, as the official torch.var) plus eps."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64)
    offset = torch.tensor([[0.3, -0.5], [0.0, 1.0]])
    scale = torch.tensor([[0.7, 1.5], [2.0, 0.4]])
    w = gaussian_weights(x, offset, scale, eps=1e-5)
    for h in range(2):
        for ch in range(3):
            col = [x[0, h, n, ch].item() for n in range(6)]
            mu = sum(col) / 6
            sigma = math.sqrt(sum((c - mu) ** 2 for c in col) / 5 + 1e-5)
            dens = []
            for c in col:
                p = 1.0
                for gi in range(2):
                    y = (c - mu - offset[h, gi].item()) / sigma
                    p *= math.exp(-y * y / (2 * scale[h, gi].item() ** 2))
                dens.append(p)
            expected = torch.tensor([d / sum(dens) for d in dens], dtype=torch.float64)
            torch.testing.assert_close(w[0, h, :, ch], expected, atol=1e-12, rtol=1e-10)


@torch.no_grad()
def test_gaam_output_is_the_values_times_their_weights():
    attn = build("gaam", heads=2, gaussians=2)
    with torch.no_grad():
        attn.offset.copy_(torch.tensor([[0.2, -0.3], [0.5, 0.0]]))
    x = torch.randn(2, 7, DIM)
    v = (x @ attn.qkv.v.weight.T).view(2, 7, 2, DIM // 2).transpose(1, 2)
    m = gaussian_weights(v, attn.offset, attn.scale, eps=attn.eps)
    expected = (v * m).transpose(1, 2).flatten(2) @ attn.o_proj.weight.T
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_gaam_padded_tokens_get_no_weight():
    x = torch.randn(2, 3, 10, 5)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 6:] = False
    w = gaussian_weights(x, torch.zeros(3, 2), torch.ones(3, 2), keep=keep)
    assert (w[0, :, 6:] == 0).all()
    torch.testing.assert_close(w.sum(2), torch.ones(2, 3, 5))


# ------------------------------------------------------------------------------------ rcmha
def test_rcmha_scores_are_the_relative_table_decomposition():
    attn = build("rcmha", causal=True, max_len=8)
    with torch.no_grad():
        attn.u.normal_()
        attn.rel_emb.normal_()
        attn.rel_bias.normal_()
    x = torch.randn(1, 6, DIM)
    seen = {}
    attn.hook_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.hook_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    attn.hook_v.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))
    attn.hook_heads.register_forward_hook(lambda m, i, o: seen.__setitem__("heads", o))
    w = attn.weights(x)
    attn(x)
    q, k, v = seen["q"][0], seen["k"][0], seen["v"][0]
    e, b, p = attn.rel_emb, attn.rel_bias, attn.max_len
    d = attn.head_dim
    scores = torch.full((4, 6, 6), float("-inf"))
    for h in range(4):
        for i in range(6):
            for j in range(i + 1):
                scores[h, i, j] = ((q[h, i] + attn.u[h]) @ k[h, j] + q[h, i] @ e[p - (i - j), h]
                                   + b[p - (i - j), h]) / math.sqrt(d)
    torch.testing.assert_close(w[0], torch.softmax(scores, -1), atol=1e-5, rtol=1e-5)
    # and the output is these weights times the values, per head (not weights() @ v again)
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(seen["heads"][0].transpose(0, 1), expected, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rcmha_tiles_equal_the_dense_weights_forward_and_backward(monkeypatch, kv_heads):
    """attend (tiles of 16 query rows here, recomputed in the backward) against the dense
    weights times the values, with padding, an odd length and GQA."""
    import attnlab.mechanisms.rcmha as rcmha

    monkeypatch.setattr(rcmha, "auto_block_size", lambda batch_heads, lk: 16)
    attn = build("rcmha", causal=True, kv_heads=kv_heads, max_len=20).double()
    with torch.no_grad():  # 37 tokens: distances beyond max_len read the farthest row too
        attn.u.normal_()
        attn.rel_emb.normal_()
        attn.rel_bias.normal_()
    x = torch.randn(2, 37, DIM, dtype=torch.float64)
    keep = torch.ones(2, 37, dtype=torch.bool)
    keep[1, 30:] = False
    grad = torch.randn(2, 37, DIM, dtype=torch.float64)
    results = []
    for dense in (False, True):
        if dense:
            monkeypatch.setattr(attn, "attend", lambda q, k, v, call: attn.attention_weights(
                q, k, call).to(v.dtype) @ attn.expand_kv(v))
        xi = x.clone().requires_grad_()
        out = attn(xi, mask=keep)
        params = [xi, attn.u, attn.rel_emb, attn.rel_bias]
        results.append((out, *torch.autograd.grad(out, params, grad)))
    for tiled, dense in zip(*results, strict=True):
        torch.testing.assert_close(tiled, dense)


# ----------------------------------------------------------------------------------- medusa
def test_medusa_scale_one_heads_are_softmax_and_coarse_heads_average_cells():
    attn = build("medusa", scales=(1, 2))
    ref = build("softmax")
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 4, 6, DIM)
    w, w_ref = attn.weights(x), ref.weights(x)
    torch.testing.assert_close(w[:, 0::2], w_ref[:, 0::2])
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 24))
    # a scale-2 head gives the same weight to the 4 tokens of a 2 x 2 cell
    cell = w[0, 1, 0].view(4, 6)[:2, :2]
    torch.testing.assert_close(cell, cell[0, 0].expand(2, 2))


# ---------------------------------------------------------------------------- mil_attention
def test_mil_rows_are_the_bag_attention_and_pool_gives_one_embedding_per_branch():
    attn = build("mil_attention", heads=3)
    x = torch.randn(2, 9, DIM)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 5:] = False
    w = attn.weights(x, mask=keep)
    torch.testing.assert_close(w, w[:, :, :1].expand_as(w))  # every token sees the same bag
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 9))
    assert (w[1, :, :, 5:] == 0).all()
    z = attn.pool(x, mask=keep)
    assert z.shape == (2, 3, DIM)
    y = attn(x, mask=keep)
    torch.testing.assert_close(z.mean(1), y[:, 0])  # the slide embedding: the branches' mean


@torch.no_grad()
def test_mil_weights_and_output_are_gated_attention_pooling_written_out():
    """a_m = softmax_n(w_m . (tanh(V h_n) * sigmoid(U h_n))) with V, U shared by the branches,
    z_m = sum_n a_mn h_n, output mean_m z_m; from the parameters, one instance at a time."""
    attn = build("mil_attention", heads=2, attn_dim=6)
    proj = attn.qkv
    x = torch.randn(1, 5, DIM)
    w = attn.weights(x)
    y = attn(x).detach()
    z = []
    for m in range(2):
        scores = []
        for n in range(5):
            h = x[0, n]
            feats = torch.tanh(proj.features.weight @ h + proj.features.bias) * \
                torch.sigmoid(proj.gate.weight @ h + proj.gate.bias)
            scores.append((proj.branch.weight[m] @ feats).item())
        top = max(scores)
        a = [math.exp(s - top) for s in scores]
        a = torch.tensor([e / sum(a) for e in a])
        torch.testing.assert_close(w[0, m, 3], a, atol=1e-6, rtol=1e-5)
        z.append(sum(a[n] * x[0, n] for n in range(5)))
    torch.testing.assert_close(y[0, 2], (z[0] + z[1]) / 2, atol=1e-5, rtol=1e-5)


def test_mil_stochastic_top_k_masking_drops_only_top_instances_in_training():
    attn = build("mil_attention", heads=2, top_k=3, mask_rate=0.99)
    x = torch.randn(4, 20, DIM)
    eval_w = attn.weights(x)[:, :, 0]
    attn.train()
    torch.manual_seed(1)
    train_w = attn.weights(x)[:, :, 0]
    dropped = (eval_w > 0) & (train_w == 0)
    top3 = torch.zeros_like(eval_w, dtype=torch.bool).scatter_(-1, eval_w.topk(3, -1).indices,
                                                                True)
    assert dropped.any() and not (dropped & ~top3).any()
    torch.testing.assert_close(train_w.sum(-1), torch.ones(4, 2))


def test_mil_stochastic_top_k_masking_drops_exactly_int_k_rate_of_the_top_k():
    attn = build("mil_attention", heads=3, top_k=5, mask_rate=0.6)  # int(5 * 0.6) = 3
    x = torch.randn(4, 20, DIM)
    eval_w = attn.weights(x)[:, :, 0]
    attn.train()
    for seed in range(3):
        torch.manual_seed(seed)
        train_w = attn.weights(x)[:, :, 0]
        assert ((eval_w > 0) & (train_w == 0)).sum(-1).eq(3).all()


def test_mil_diversity_loss_is_the_mean_pairwise_cosine_of_the_branch_attention():
    attn = build("mil_attention", heads=3, top_k=0).train()
    x = torch.randn(2, 9, DIM)
    attn(x)
    a = attn.weights(x)[:, :, 0]  # (B, M, N); top_k=0: no masking, so the same attention
    a = a / a.norm(dim=-1, keepdim=True)
    cos = (a @ a.transpose(1, 2))[:, [0, 0, 1], [1, 2, 2]]
    torch.testing.assert_close(attn.extra_loss(), cos.mean())
    attn.eval()
    attn(x)
    assert attn.extra_loss().item() == 0  # a training loss only


def test_moh_routes_in_float32_in_a_bfloat16_module():
    """The routers' logits are computed in float32 from bf16 weights and inputs (the docs'
    "routes in at least float32"): a bf16 matmul made 9 of 2048 tokens choose other heads."""
    torch.manual_seed(0)
    m32 = al.build("moh", dim=256, heads=16, top_k=2)
    rounded = {k: v.to(torch.bfloat16) for k, v in m32.state_dict().items()}
    m16 = al.build("moh", dim=256, heads=16, top_k=2).to(torch.bfloat16)
    m16.load_state_dict(rounded)
    m32.load_state_dict({k: v.float() for k, v in rounded.items()})
    x = torch.randn(4, 512, 256).to(torch.bfloat16)
    assert torch.equal(m16.gates(x) > 0, m32.gates(x.float()) > 0)
