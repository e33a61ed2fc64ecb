"""mil_attention against the official ACMIL module (dazhangyu123/ACMIL @ e53d19c,
architecture/transformer.py ``ACMIL_GA`` with its ``Attention_Gated``; the branch-diversity
loss from Step3_WSI_classification_ACMIL.py's training step).

Re-expressed here in float64 from reading that code, in its parameter layout
(``attention_V`` and ``attention_U``: Linear(C, D) shared by the branches, ``attention_weights``:
Linear(D, K) with bias), one bag at a time as the official (``x[0]``). Compared: the branch
features ``afeat`` (K, C) = ``pool(x)``, the slide feature (softmax averaged over branches,
pooled) = the module output at any token, the diversity loss = ``extra_loss()``, and the
gradients of all three, with STKIM on (the same random numbers: one draw of (K, top-k)).
The dimension reduction before and the classifiers after are the model's, not compared.
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="mil_attention",
    code="dazhangyu123/ACMIL @ e53d19c, architecture/transformer.py, ACMIL_GA + Attention_Gated",
    differences=(
        "no bias on the branch score weights w_m (a constant per branch: no effect on softmax "
        "or top-K; its official gradient is 0 too)",
        "several bags per batch with a key padding mask (contract; the official runs one bag)",
        "DimReduction and the classifiers belong to the model, not this module",
    ),
)

N, C, D, BRANCHES, TOP_K, RATE = 12, 16, 8, 3, 5, 0.6


def official_params(gen: torch.Generator) -> dict[str, torch.Tensor]:
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5
    return {k: leaf(v) for k, v in {
        "attention_V.weight": w(D, C), "attention_V.bias": w(D),
        "attention_U.weight": w(D, C), "attention_U.bias": w(D),
        "attention_weights.weight": w(BRANCHES, D), "attention_weights.bias": w(BRANCHES),
    }.items()}


def official_forward(p, bag, training: bool):
    """(branch features (K, C), slide feature (1, C), diversity loss) of one bag (N, C)."""
    v = torch.tanh(bag @ p["attention_V.weight"].T + p["attention_V.bias"])
    u = torch.sigmoid(bag @ p["attention_U.weight"].T + p["attention_U.bias"])
    scores = ((v * u) @ p["attention_weights.weight"].T + p["attention_weights.bias"]).T  # K, N
    if training and TOP_K > 0:
        k = min(TOP_K, scores.shape[1])
        best = scores.topk(k, dim=-1).indices
        order = torch.argsort(torch.rand(best.shape, dtype=torch.float32), dim=-1)
        hidden = best.gather(1, order[:, :int(k * RATE)])
        keep = torch.ones_like(scores).scatter(1, hidden, 0.0)
        scores = scores.masked_fill(keep == 0, -1e9)
    att = torch.softmax(scores, dim=1)
    branch_feats = att @ bag
    slide_feat = att.mean(0, keepdim=True) @ bag
    pairs = BRANCHES * (BRANCHES - 1) / 2
    diversity = bag.new_zeros(())
    for i in range(BRANCHES):
        for j in range(i + 1, BRANCHES):
            diversity = diversity + torch.cosine_similarity(
                att[None, i], att[None, j], dim=-1).mean() / pairs
    return branch_feats, slide_feat, diversity


MAP = {"qkv.features.weight": "attention_V.weight", "qkv.features.bias": "attention_V.bias",
       "qkv.gate.weight": "attention_U.weight", "qkv.gate.bias": "attention_U.bias",
       "qkv.branch.weight": "attention_weights.weight"}


@pytest.mark.parametrize("training", [True, False])
def test_mil_attention_equals_the_official_acmil_ga(training):
    gen = torch.Generator().manual_seed(3)
    p = official_params(gen)
    bag = torch.randn(N, C, generator=gen, dtype=torch.float64)
    r_branch = torch.randn(BRANCHES, C, generator=gen, dtype=torch.float64)
    r_slide = torch.randn(1, C, generator=gen, dtype=torch.float64)

    xo = leaf(bag)
    torch.manual_seed(11)
    feats, slide, div = official_forward(p, xo, training)
    # the diversity loss is a training loss (the official adds it in its training step)
    ((feats * r_branch).sum() + (slide * r_slide).sum() + div * training).backward()

    attn = al.build("mil_attention", dim=C, heads=BRANCHES, top_k=TOP_K, mask_rate=RATE,
                    attn_dim=D).double().train(training)
    own = dict(attn.named_parameters())
    assert set(own) == set(MAP), "every parameter mapped"
    with torch.no_grad():
        for mine, theirs in MAP.items():
            own[mine].copy_(p[theirs])
    xa = leaf(bag[None])
    torch.manual_seed(11)
    z = attn.pool(xa)[0]
    torch.manual_seed(11)  # the same STKIM draw as the official's one forward
    y = attn(xa)
    loss = (z * r_branch).sum() + (y[0, 0] * r_slide[0]).sum() + attn.extra_loss()
    loss.backward()

    pairs = {"branch features": (z, feats), "slide feature": (y[0], slide.expand(N, C)),
             "grad x": (xa.grad[0], xo.grad)}
    if training:
        pairs["diversity loss"] = (attn.extra_loss(), div)
    pairs |= {f"grad {mine}": (own[mine].grad, p[theirs].grad) for mine, theirs in MAP.items()}
    assert_parity(pairs)
    # the branch bias the module leaves out: a per-branch constant, gradient 0 there too
    assert p["attention_weights.bias"].grad.abs().max() < 1e-12
