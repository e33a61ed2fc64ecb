"""The catalogue's checks (docs/mechanisms/) for the local, structured and sparse
mechanisms."""

import math

import pytest
import torch

import attnlab as al
from attnlab.ops import neighborhood_visibility
from attnlab.ops.longheads import chunk_keys, select_chunks
from attnlab.ops.spectral import spectral_gating

DIM, HEADS = 32, 4


def build(name, **kw):
    torch.manual_seed(0)
    return al.build(name, dim=DIM, heads=HEADS, **kw).eval()


# ------------------------------------------------------------------ neighborhood, msa_conv
def test_neighborhood_module_on_video_sees_exactly_k_cubed_keys():
    attn = build("neighborhood", kernel_size=3)
    x = torch.randn(2, 4, 5, 6, DIM)
    assert attn(x).shape == x.shape
    w = attn.weights(x)
    assert ((w > 0).sum(-1) == 27).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, HEADS, 120))


def test_neighborhood_causal_axes_on_video_keep_the_past_frames_fixed():
    attn = build("neighborhood", kernel_size=3, causal_axes=(True, False, False))
    x = torch.randn(1, 4, 3, 3, DIM)
    y = attn(x)
    x2 = x.clone()
    x2[:, 2:] = torch.randn_like(x2[:, 2:])
    torch.testing.assert_close(attn(x2)[:, :2], y[:, :2])


def test_neighborhood_stride_cannot_decode_but_runs():
    attn = build("neighborhood", kernel_size=4, stride=2, causal=True)
    assert attn(torch.randn(1, 11, DIM)).shape == (1, 11, DIM)
    with pytest.raises(ValueError, match="stride=1"):
        attn.new_state(1)


def test_neighborhood_with_kernel_covering_everything_is_softmax():
    attn = build("neighborhood", kernel_size=50)
    ref = build("softmax")
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 13, DIM)
    torch.testing.assert_close(attn(x), ref(x), atol=1e-5, rtol=1e-5)


def test_msa_conv_keys_are_the_convolution_window_and_depthwise_has_one_channel_per_head():
    attn = build("msa_conv", kernel_size=3, dilation=2)
    x = torch.randn(1, 5, 6, DIM)
    w = attn.weights(x)
    expected = neighborhood_visibility((5, 6), kernel_size=3, dilation=2, border="clip")
    assert torch.equal(w[0, 0] > 0, expected)
    assert expected.sum(-1).min() == 4 and expected.sum(-1).max() == 9  # corners see 2 x 2
    depthwise = al.build("msa_conv", dim=DIM, heads=HEADS, heads_per_channel=True)
    assert depthwise.heads == DIM and depthwise.head_dim == 1


# ---------------------------------------------------------------------------------- maxvit
def receptive_field(module, x, index):
    x = x.clone().requires_grad_()
    module(x).reshape(-1, DIM)[index].sum().backward()
    return x.grad.abs().sum(-1)[0] > 0  # (H, W)


def test_maxvit_block_alone_is_local_block_then_grid_is_global():
    x = torch.randn(1, 6, 6, DIM)
    block = build("maxvit", axis="block", window=3)
    field = receptive_field(block, x, 0)
    assert field[:3, :3].all() and field.sum() == 9
    grid = build("maxvit", axis="grid", grid=3)
    both = torch.nn.Sequential(block, grid)
    assert receptive_field(both, x, 0).all()
    # "block+grid" splits the heads: one layer sees the window and the (strided) grid group,
    parallel = build("maxvit", window=3, grid=3)
    field = receptive_field(parallel, x, 0)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:3, :3] = True
    expected[::2, ::2] = True
    assert torch.equal(field, expected)
    # two such layers see everything
    assert receptive_field(torch.nn.Sequential(parallel, build("maxvit", window=3, grid=3)),
                           x, 0).all()


def test_maxvit_window_equal_to_the_image_is_full_attention():
    attn = build("maxvit", axis="block", window=5)
    grid = build("maxvit", axis="grid", grid=5)
    with torch.no_grad():
        attn.bias["block"].table.zero_()
        grid.bias["grid"].table.zero_()
    ref = build("softmax")
    ref.load_state_dict({k: v for k, v in attn.state_dict().items() if "bias" not in k})
    grid.load_state_dict(attn.state_dict() | {"bias.grid.table": grid.bias["grid"].table},
                         strict=False)
    x = torch.randn(2, 5, 5, DIM)
    torch.testing.assert_close(attn(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid(x), ref(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- spectral
def test_spectral_gating_is_a_circular_convolution_and_ones_is_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
    real, imag = torch.randn(4, 4, 3, dtype=torch.float64), torch.randn(4, 4, 3,
                                                                          dtype=torch.float64)
    y = spectral_gating(x, real, imag)
    # the kernel whose spectrum is the filter (Hermitian part: what irfft2 keeps)
    kernel = torch.fft.irfft2(torch.complex(real, imag), s=(4, 6), dim=(0, 1))
    expected = torch.zeros_like(x)
    for a in range(4):
        for b in range(6):
            expected += kernel[a, b] * torch.roll(x, shifts=(a, b), dims=(1, 2))
    torch.testing.assert_close(y, expected)
    ones = torch.ones(4, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(spectral_gating(x, ones, torch.zeros_like(ones)), x)


def test_spectral_module_resizes_its_filter_to_any_grid():
    attn = build("spectral", grid_size=(4, 4))
    for shape in ((2, 4, 4, DIM), (2, 7, 9, DIM), (2, 19, DIM)):
        assert attn(torch.randn(shape)).shape == shape


# ------------------------------------------------------------------------------------ shvit
def test_shvit_attention_map_ignores_the_untouched_channels():
    attn = build("shvit", partial=0.25)
    with torch.no_grad():  # the output projection's BatchNorm scale starts at 0 (official)
        attn.proj.scale.fill_(1.0)
    x = torch.randn(2, 9, DIM)
    x2 = x.clone()
    x2[..., attn.partial_channels:] = torch.randn_like(x2[..., attn.partial_channels:])
    torch.testing.assert_close(attn.weights(x), attn.weights(x2))
    assert not torch.allclose(attn(x), attn(x2))  # they still reach the output
    x3 = x.clone()
    x3[..., :attn.partial_channels] *= torch.rand(attn.partial_channels) + 0.5  # (a shift
    # of all partial channels is undone by the GroupNorm pre-norm)
    assert not torch.allclose(attn.weights(x), attn.weights(x3))


# -------------------------------------------------------------------------------------- dma
def test_dma_with_a_large_window_and_zero_bias_is_softmax():
    attn = build("dma", window=100, causal=True)
    ref = build("softmax", causal=True)
    ref.load_state_dict({k: v for k, v in attn.state_dict().items()
                         if not k.startswith(("delta_proj", "A"))})
    x = torch.randn(2, 17, DIM)
    torch.testing.assert_close(attn(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_dma_keeps_at_most_w_keys_and_prefers_large_bias(causal):
    attn = build("dma", window=4, causal=causal)
    with torch.no_grad():
        attn.A.fill_(3.0)
    x = torch.randn(2, 15, DIM)
    w = attn.weights(x)
    assert ((w > 0).sum(-1) <= 4).all()
    assert ((w > 0).sum(-1) == torch.clamp(torch.arange(1, 16), max=4)).all() if causal \
        else ((w > 0).sum(-1) == 4).all()
    # the kept keys are the visible keys with the largest delta
    seen = {}
    attn.hook_v.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))
    attn(x)
    delta = attn.key_bias(seen["v"])[0, 0, 0]  # (L,) for batch 0, head 0
    row = w[0, 0, -1]
    kept = set(torch.nonzero(row > 0).flatten().tolist())
    assert kept == set(delta.topk(4).indices.tolist())


@pytest.mark.parametrize("causal", [True, False])
def test_dma_tiled_selection_equals_its_dense_reference_in_the_module(causal):
    """With a non-zero A, GQA and key padding, forward and gradients equal the module run
    through ``attend_dense`` (the (Lq, Lk) top-w mask); decoding step by step too."""
    attn = build("dma", window=5, causal=causal, kv_heads=2).double().train()
    with torch.no_grad():
        attn.A.copy_(torch.tensor([2.0, -1.5]))
    x = torch.randn(2, 40, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :7] = False
    out = attn(x, mask=mask)
    grads = torch.autograd.grad(out.sum(), [x, *attn.parameters()])
    dense = build("dma", window=5, causal=causal, kv_heads=2).double().train()
    dense.load_state_dict(attn.state_dict())
    dense.attend = dense.attend_dense
    ref = dense(x, mask=mask)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *dense.parameters()])
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)
    if causal:
        attn.eval()
        state = attn.new_state(batch_size=1)
        steps = [attn(x[:1, t:t + 1].detach(), state=state) for t in range(40)]
        torch.testing.assert_close(torch.cat(steps, 1), attn(x[:1].detach()))


def test_dma_at_initialisation_is_a_sliding_window():
    attn = build("dma", window=3, causal=True)
    w = attn.weights(torch.randn(1, 9, DIM))[0, 0]
    i = torch.arange(9)
    assert torch.equal(w > 0, (i[None] <= i[:, None]) & (i[None] > i[:, None] - 3))


# ------------------------------------------------------------------------------ sparsifiner
def test_sparsifiner_keeping_everything_is_dense_attention():
    attn = build("sparsifiner", keep=1.0)
    ref = build("softmax")
    ref.load_state_dict({k: v for k, v in attn.state_dict().items() if "predictor" not in k})
    x = torch.randn(2, 13, DIM)
    torch.testing.assert_close(attn(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_sparsifiner_tiles_equal_the_dense_reference_with_distillation(causal):
    """Several tiles of query rows: output, distillation loss and every gradient equal the
    module run through ``attend_dense`` (the (L, L) connectivity at once)."""
    attn = build("sparsifiner", predictor="lowrank", keep=0.3, rank=4, causal=causal,
                 kv_heads=2, distill_weight=1.0).double().train()
    attn.rows_per_tile = 7
    x = torch.randn(2, 40, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :9] = False
    dense = build("sparsifiner", predictor="lowrank", keep=0.3, rank=4, causal=causal,
                  kv_heads=2, distill_weight=1.0).double().train()
    dense.load_state_dict(attn.state_dict())
    dense.attend = dense.attend_dense
    results = []
    for module in (attn, dense):
        out = module(x, mask=mask)
        loss = module.extra_loss()
        results.append((out, loss, torch.autograd.grad(out.sum() + loss,
                                                       [x, *module.parameters()])))
    (out, loss, grads), (ref, ref_loss, ref_grads) = results
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


def test_sparsifiner_keeps_at_most_k_keys_and_trains_its_predictor_by_distillation():
    attn = build("sparsifiner", keep=0.3)
    x = torch.randn(2, 13, DIM)
    w = attn.weights(x)
    assert ((w > 0).sum(-1)[:, :, 1:] <= math.ceil(0.3 * 13)).all()  # row 0: the cls row
    attn.train()
    attn(x)
    loss = attn.extra_loss()
    assert loss > 0
    loss.backward()
    assert attn.predictor.proj_back_n.grad.abs().sum() > 0
    assert attn.qkv.q.weight.grad is None  # the distillation reaches only the predictor


@torch.no_grad()
def test_sparsifiner_keeps_the_keys_of_highest_predicted_connectivity_written_out():
    """Per row, the ceil(keep L) keys of largest a_i . b_j (the low-rank connectivity), then
    softmax of q.k / sqrt(d) over those keys only; from the parameters, row by row."""
    torch.manual_seed(0)
    attn = al.build("sparsifiner", dim=DIM, heads=2, keep=0.3, causal=False, rank=3,
                    predictor="lowrank").eval()
    x = torch.randn(1, 10, DIM)
    w = attn.weights(x)
    d, count = DIM // 2, math.ceil(0.3 * 10)
    for h in range(2):
        a = x[0] @ attn.conn_a.weight[3 * h:3 * h + 3].T
        b = x[0] @ attn.conn_b.weight[3 * h:3 * h + 3].T
        q = x[0] @ attn.qkv.q.weight[d * h:d * h + d].T
        k = x[0] @ attn.qkv.k.weight[d * h:d * h + d].T
        for i in range(10):
            conn = [float(a[i] @ b[j]) for j in range(10)]
            kept = sorted(range(10), key=lambda j: conn[j], reverse=True)[:count]
            e = {j: math.exp(float(q[i] @ k[j]) / math.sqrt(d)) for j in kept}
            expected = torch.tensor([e.get(j, 0.0) / sum(e.values()) for j in range(10)])
            torch.testing.assert_close(w[0, h, i], expected, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------- longheads
@pytest.mark.parametrize("rope", [False, True])
def test_longheads_within_budget_is_full_causal_attention(rope):
    attn = build("longheads", chunk_size=4, budget=4, causal=True, rope=rope)
    ref = build("softmax", causal=True, rope=rope)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, 16, DIM)  # 4 chunks = the budget
    torch.testing.assert_close(attn(x), ref(x), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 17, DIM)  # 5 chunks: now it is sparse
    assert not torch.allclose(attn(x), ref(x), atol=1e-4)


def test_longheads_output_follows_the_chunk_rule_written_out_per_query():
    """Weights and output against a loop over queries: score the earlier complete chunks
    by q . the attention-pooled chunk key, keep chunk 0, the previous and the local chunk and
    the best others up to the budget, softmax over the kept keys j <= i."""
    torch.manual_seed(3)
    w, budget, length = 3, 4, 17
    attn = build("longheads", chunk_size=w, budget=budget, causal=True)
    x = torch.randn(1, length, DIM)
    seen = {}
    for name in ("hook_q", "hook_k", "hook_v", "hook_heads"):
        getattr(attn, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o[0]))
    attn(x)
    q, k, v = (seen[name].detach() for name in ("hook_q", "hook_k", "hook_v"))
    heads, d = q.shape[0], q.shape[-1]

    def chunk_key(h, c):
        qc, kc, vc = (t[h, c * w:(c + 1) * w] for t in (q, k, v))
        vbar = (torch.softmax(qc @ kc.T / d ** 0.5, -1) @ vc).mean(0)
        return torch.softmax(vbar @ kc.T / d ** 0.5, -1) @ kc

    expected = torch.zeros(heads, length, d)
    for h in range(heads):
        for i in range(length):
            local = i // w
            scores = {c: float(q[h, i] @ chunk_key(h, c)) for c in range(1, local - 1)}
            best = sorted(scores, key=scores.get, reverse=True)[:budget - 3]
            kept = [j for j in range(i + 1) if j // w in {0, local - 1, local, *best}]
            a = torch.softmax(torch.stack([q[h, i] @ k[h, j] for j in kept]) / d ** 0.5, 0)
            expected[h, i] = a @ v[h, kept]
    torch.testing.assert_close(seen["hook_heads"].transpose(0, 1), expected, atol=1e-5,
                               rtol=1e-5)


def test_longheads_selects_a_planted_matching_chunk():
    torch.manual_seed(0)
    d, w = 16, 4
    q = torch.randn(1, 2, 1, d)
    k = torch.randn(1, 2, 40, d) * 0.1
    k[0, 0, 20:24] = q[0, 0, 0] * 3  # chunk 5 matches head 0's query
    k[0, 1, 12:16] = q[0, 1, 0] * 3  # chunk 3 matches head 1's query
    keys = chunk_keys(torch.randn(1, 2, 40, d), k, torch.randn(1, 2, 40, d), chunk_size=w)
    sel = select_chunks(q, keys, torch.tensor([39]), chunk_size=w, budget=4, length=40)[0, :, 0]
    assert sel[0].nonzero().flatten().tolist() == [0, 5, 8, 9]  # first, planted, prev, local
    assert sel[1].nonzero().flatten().tolist() == [0, 3, 8, 9]


@pytest.mark.parametrize("name,kwargs", [("dma", {"window": 64}), ("longheads", {}),
                                         ("sparsifiner", {"keep": 0.25,
                                                          "predictor": "lowrank"})])
def test_selective_mechanisms_keep_memory_linear_in_length_for_training(name, kwargs):
    """What autograd keeps for the backward at L = 1024 is far below one (L, L) matrix per
    head: the selection and the scores live one tile at a time."""
    from tests.ops.cases import saved_bytes_beyond

    length = 1024
    attn = build(name, causal=True, **kwargs).train()
    x = torch.randn(1, length, DIM, requires_grad=True)
    kept = saved_bytes_beyond((x, *attn.parameters()), lambda: attn(x))
    assert kept < HEADS * length * length * 4 / 8
