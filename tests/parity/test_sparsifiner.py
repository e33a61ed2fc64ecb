"""sparsifiner against the official Sparsifiner attention (lim142857/Sparsifiner @ 9a11e26,
src/models/sparsifiner.py: ``Attention`` with its ``MaskPredictor``; the released default
configuration experiments-results-analysis/experiments/sparsifiner_default_config.yaml:
REDUCE_N_FACTOR 6, REDUCE_C_FACTOR 2, BASIS_THRESHOLD 0.02, BASIS_COEF top 8, ATTN_SCORE
top-k, ATTN_KEEP_RATE 0.25; src/losses.py: reconstruction loss MSE with reduction 'sum',
weight 0.01).

Re-expressed here in float64 from reading that code, in its parameter layout (fused ``qkv``
with bias, ``proj``, ``mask_predictor.proj_c_q`` / ``proj_c_k`` (head_dim -> head_dim / 2,
with bias, shared by the heads), ``mask_predictor.proj_n`` and ``proj_back_n`` (N x N / 6)).
Two phases of the official module are compared: the sparse attention (evaluation, and training
outside the reconstruction phase), output and every gradient; and the reconstruction loss of
the predictor against the attention it approximates (the official teacher's attention is the
module's own when the backbone is the teacher, as in that phase), its value and the
predictor's gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="sparsifiner",
    code="lim142857/Sparsifiner @ 9a11e26, src/models/sparsifiner.py, Attention + MaskPredictor",
    differences=(
        "distillation: attnlab's own dense attention (no gradient) replaces the teacher's, "
        "and the output stays sparse in training (contract: one module, no teacher model; "
        "the official reconstruction phase runs dense attention with a frozen backbone)",
        "the budget is ceil(keep * L) of the input's L (official: of the fixed N, and of the "
        "first sample's real tokens when pruned); equal at L = N",
        "causal and key padding: each query compresses only the keys it sees (the official "
        "has no causal mode; its padded keys' reduced rows are 0 as here, but its cls row "
        "attends to padded tokens)",
        "top-k ties go to the later key (official torch.topk: unspecified)",
        "qkv and proj keep PyTorch's init; the official model re-initialises every linear "
        "trunc-normal 0.02 (a model-level choice); the predictor's init is the official's",
    ),
)

B = 2


def official_params(n_tok: int, dim: int, heads: int, reduce_n: int, reduce_c: int,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    hd = dim // heads
    rc, rn = hd // reduce_c, n_tok // reduce_n

    def w(*shape, std=None):
        std = shape[-1] ** -0.5 if std is None else std
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std
    p = {"qkv.weight": w(3 * dim, dim), "qkv.bias": w(3 * dim, std=0.3),
         "proj.weight": w(dim, dim), "proj.bias": w(dim, std=0.3),
         "mask_predictor.proj_c_q.weight": w(rc, hd), "mask_predictor.proj_c_q.bias": w(rc),
         "mask_predictor.proj_c_k.weight": w(rc, hd), "mask_predictor.proj_c_k.bias": w(rc),
         "mask_predictor.proj_n": w(n_tok, rn, std=0.5),
         "mask_predictor.proj_back_n": w(n_tok, rn, std=0.05)}  # some |entries| <= 0.02
    return {k: leaf(v) for k, v in p.items()}


def predictor(p, q, k, heads: int, keep: float, topk: int, threshold: float, recon: bool):
    """The official MaskPredictor: (attention mask (B, H, N, N), approx (B, H, N-1, N))."""
    mp = "mask_predictor."
    b, h, n, _ = q.shape
    qc = q @ p[mp + "proj_c_q.weight"].T + p[mp + "proj_c_q.bias"]
    kc = k @ p[mp + "proj_c_k.weight"].T + p[mp + "proj_c_k.bias"]
    kc = kc.permute(0, 1, 3, 2) @ p[mp + "proj_n"]  # (B, H, c, n_red)
    back = p[mp + "proj_back_n"].permute(1, 0)
    if not recon:
        back = torch.where(back.abs() > threshold, back.abs(), torch.zeros_like(back))
    coef = torch.softmax(((qc @ kc) * heads ** -0.5)[..., 1:, :], dim=-1)
    if not recon:
        vals, idx = coef.topk(topk, sorted=False)
        coef = torch.zeros_like(coef).scatter(-1, idx, vals)
    approx = coef @ back
    budget = math.ceil(keep * n)
    mask = torch.zeros_like(approx).scatter(-1, torch.topk(approx, budget, sorted=False)[1], 1)
    mask = torch.cat([torch.ones(b, h, 1, n, dtype=mask.dtype), mask], dim=2).detach()
    return mask, approx


def official_forward(p, x, heads: int, keep: float, topk: int, threshold: float):
    """Output (sparse attention), the recon-phase approximation, the dense attention and the
    sparse attention matrix."""
    b, n, c = x.shape
    qkv = (x @ p["qkv.weight"].T + p["qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    mask, _ = predictor(p, q, k, heads, keep, topk, threshold, recon=False)
    _, approx = predictor(p, q, k, heads, keep, topk, threshold, recon=True)
    scores = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    dense = scores.softmax(-1)
    att = torch.nan_to_num(scores.masked_fill(~mask.bool(), float("-inf")).softmax(-1))
    y = (att @ v).transpose(1, 2).reshape(b, n, c)
    return y @ p["proj.weight"].T + p["proj.bias"], approx, dense, att


def to_attnlab(attn, p) -> dict[str, tuple[str, int | None]]:
    """Copy the official weights into ``attn``; attnlab name -> (official name, qkv part)."""
    names = {"qkv.q.weight": ("qkv.weight", 0), "qkv.k.weight": ("qkv.weight", 1),
             "qkv.v.weight": ("qkv.weight", 2), "qkv.q.bias": ("qkv.bias", 0),
             "qkv.k.bias": ("qkv.bias", 1), "qkv.v.bias": ("qkv.bias", 2),
             "o_proj.weight": ("proj.weight", None), "o_proj.bias": ("proj.bias", None)}
    for part in ("proj_c_q.weight", "proj_c_q.bias", "proj_c_k.weight", "proj_c_k.bias",
                 "proj_n", "proj_back_n"):
        names[f"predictor.{part}"] = (f"mask_predictor.{part}", None)
    own = dict(attn.named_parameters())
    assert set(own) == set(names), "every parameter mapped"
    with torch.no_grad():
        for mine, (theirs, part) in names.items():
            own[mine].copy_(p[theirs] if part is None else p[theirs].chunk(3, 0)[part])
    return names


def official_grad(p, theirs: str, part: int | None) -> torch.Tensor | None:
    g = p[theirs].grad
    return g if g is None or part is None else g.chunk(3, 0)[part]


CONFIGS = [  # tokens, dim, heads, reduce_n, reduce_c, coef_topk, keep
    pytest.param(13, 16, 2, 3, 2, 2, 0.25, id="N13-H2-n4-top2"),
    pytest.param(17, 24, 3, 2, 2, 3, 0.25, id="N17-H3-n8-top3"),
    pytest.param(16, 24, 4, 4, 3, 4, 0.5, id="N16-H4-c2-n4-top4-keep0.5"),
]


def build(n_tok, dim, heads, reduce_n, reduce_c, topk, keep):
    return al.build("sparsifiner", dim=dim, heads=heads, bias=True, tokens=n_tok, keep=keep,
                    reduce_n=reduce_n, reduce_c=reduce_c, coef_topk=topk,
                    basis_threshold=0.02).double()


@pytest.mark.parametrize("n_tok,dim,heads,reduce_n,reduce_c,topk,keep", CONFIGS)
def test_sparse_attention_equals_the_official_module(n_tok, dim, heads, reduce_n, reduce_c,
                                                     topk, keep):
    gen = torch.Generator().manual_seed(n_tok + heads)
    p = official_params(n_tok, dim, heads, reduce_n, reduce_c, gen)
    x = torch.randn(B, n_tok, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n_tok, dim, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off, _, dense, att = official_forward(p, xo, heads, keep, topk, 0.02)
    kept = (att > 0).sum(-1)[..., 1:]
    assert (kept == math.ceil(keep * n_tok)).all() and (dense > 0).all()  # sparse, really
    (y_off * weight).sum().backward()

    attn = build(n_tok, dim, heads, reduce_n, reduce_c, topk, keep).eval()
    names = to_attnlab(attn, p)
    xa = leaf(x)
    y = attn(xa)
    (y * weight).sum().backward()
    pairs = {"out": (y, y_off), "grad x": (xa.grad, xo.grad)}
    own = dict(attn.named_parameters())
    for mine, (theirs, part) in names.items():
        if mine.startswith("predictor."):  # the mask carries no gradient, in both
            assert own[mine].grad is None and p[theirs].grad is None, mine
            continue
        pairs[f"grad {mine}"] = (own[mine].grad, official_grad(p, theirs, part))
    assert_parity(pairs)
    with torch.no_grad():  # weights() is the same sparse matrix
        assert_parity({"weights": (attn.weights(x), att)})


@pytest.mark.parametrize("n_tok,dim,heads,reduce_n,reduce_c,topk,keep", CONFIGS)
def test_distillation_equals_the_official_reconstruction_loss(n_tok, dim, heads, reduce_n,
                                                              reduce_c, topk, keep):
    """Training: attnlab's extra_loss() is the official 0.01 * MSE-sum of the reconstructed
    connectivity to the dense attention (cls row excepted); the predictor's gradients of it
    agree. The output in training is the sparse attention, as the official's outside the
    reconstruction phase."""
    gen = torch.Generator().manual_seed(100 + n_tok)
    p = official_params(n_tok, dim, heads, reduce_n, reduce_c, gen)
    x = torch.randn(B, n_tok, dim, generator=gen, dtype=torch.float64)
    y_off, approx, dense, _ = official_forward(p, leaf(x), heads, keep, topk, 0.02)
    loss_off = 0.01 * (approx - dense[..., 1:, :].detach()).square().sum()
    loss_off.backward()

    attn = build(n_tok, dim, heads, reduce_n, reduce_c, topk, keep).train()
    names = to_attnlab(attn, p)
    y = attn(leaf(x))
    loss = attn.extra_loss()
    loss.backward()
    pairs = {"out (training)": (y, y_off), "extra_loss": (loss, loss_off)}
    own = dict(attn.named_parameters())
    for mine, (theirs, _) in names.items():
        if mine.startswith("predictor."):
            pairs[f"grad {mine}"] = (own[mine].grad, p[theirs].grad)
    assert_parity(pairs)


def test_defaults_are_the_official_configuration():
    torch.manual_seed(0)
    attn = al.build("sparsifiner", dim=768, heads=12)
    assert (attn.kind, attn.keep, attn.distill_weight, attn.cls_token) == \
        ("basis", 0.25, 0.01, True)
    mp = attn.predictor
    assert (mp.tokens, mp.coef_topk, mp.basis_threshold) == (197, 8, 0.02)
    assert mp.proj_n.shape == mp.proj_back_n.shape == (197, 197 // 6)
    assert mp.proj_c_q.weight.shape == mp.proj_c_k.weight.shape == (32, 64)
    for t in (mp.proj_n, mp.proj_back_n, mp.proj_c_q.weight, mp.proj_c_k.weight):
        assert abs(t.std().item() - 0.02) < 0.002 and abs(t.mean().item()) < 0.002
    assert not mp.proj_c_q.bias.any() and not mp.proj_c_k.bias.any()
    with pytest.raises(ValueError, match="tokens=197"):
        attn(torch.randn(1, 198, 768))
