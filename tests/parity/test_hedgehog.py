"""hedgehog against the authors' later code, LoLCATs (HazyResearch/lolcats @ 375df84):
src/model/linear_attention/linear_attention.py ``LolcatsLinearAttention`` (the forward after
distillation, no cache, no padding) with the feature maps of src/model/feature_map.py as its
Hedgehog configuration sets them (configs/model/distill_*_lk_smd_fd64.yaml: ``softmax_dim``
full space, eps 1e-12, ``untied_head_einsum`` without bias or skip, ``tie_qk_kernels: false``).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: Llama's ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (no biases), Hugging
Face's RoPE (float32 angles), keys and values repeated for GQA, then per head
phi(x) = clamp_min([softmax(x W_h), softmax(-x W_h)], 1e-12) with W_h of shape
(head_dim, feature_dim), one ``layer`` for queries (``feature_map_q``) and one for keys
(``feature_map_k``), and causal linear attention
y_i = sum_{j<=i} (phi_q(q_i).phi_k(k_j)) v_j / (phi_q(q_i).sum_{j<=i} phi_k(k_j) + 1e-12).
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, compare_with_official, hf_rotate, leaf

OFFICIAL = Official(
    mechanism="hedgehog",
    code="HazyResearch/lolcats @ 375df84, src/model/linear_attention/linear_attention.py, "
         "LolcatsLinearAttention (feature maps: src/model/feature_map.py)",
    differences=(
        "default feature map is the Hedgehog paper's [exp(xW+b), exp(-xW-b)], W identity; "
        "LoLCATs' softmax map is feature='softmax', feature_bias=False",
        "denominator clamped at 1e-6 (LoLCATs adds 1e-12; inactive for these features)",
        "distillation through extra_loss() with the task loss (LoLCATs: a separate stage)",
    ),
)

B, N, DIM, HEADS, HD = 2, 9, 24, 4, 6


def official_params(kv_heads, feature_dim, tied, gen):
    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[-1] ** -0.5
    p = {"q_proj.weight": w(HEADS * HD, DIM), "k_proj.weight": w(kv_heads * HD, DIM),
         "v_proj.weight": w(kv_heads * HD, DIM), "o_proj.weight": w(DIM, HEADS * HD),
         "feature_map_q.mlp.layer": w(HEADS, HD, feature_dim)}
    if not tied:
        p["feature_map_k.mlp.layer"] = w(HEADS, HD, feature_dim)
    return {k: leaf(v) for k, v in p.items()}



def feature(layer, x):
    y = torch.einsum("hdf,bhld->bhlf", layer, x)
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1).clamp(min=1e-12)


def official_forward(p, x, kv_heads):
    b, n, _ = x.shape
    group = HEADS // kv_heads
    q = (x @ p["q_proj.weight"].T).reshape(b, n, HEADS, HD).transpose(1, 2)
    k = (x @ p["k_proj.weight"].T).reshape(b, n, kv_heads, HD).transpose(1, 2)
    v = (x @ p["v_proj.weight"].T).reshape(b, n, kv_heads, HD).transpose(1, 2)
    q, k = hf_rotate(q), hf_rotate(k)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    fq = feature(p["feature_map_q.mlp.layer"], q)
    fk = feature(p.get("feature_map_k.mlp.layer", p["feature_map_q.mlp.layer"]), k)
    kv = torch.einsum("bhlf,bhld->bhlfd", fk, v).cumsum(2)
    num = torch.einsum("bhlf,bhlfd->bhld", fq, kv)
    den = torch.einsum("bhlf,bhlf->bhl", fq, fk.cumsum(2)) + 1e-12
    y = (num / den[..., None]).transpose(1, 2).reshape(b, n, HEADS * HD)
    return y @ p["o_proj.weight"].T


NAMES = {"qkv.q.weight": "q_proj.weight", "qkv.k.weight": "k_proj.weight",
         "qkv.v.weight": "v_proj.weight", "o_proj.weight": "o_proj.weight",
         "phi.weight": "feature_map_q.mlp.layer", "phi_k.weight": "feature_map_k.mlp.layer"}


@pytest.mark.parametrize("kv_heads,feature_dim,tied,chunk", [
    (2, 4, False, 64), (4, 6, False, 4), (1, 3, True, 64)])
def test_hedgehog_equals_the_lolcats_module(kv_heads, feature_dim, tied, chunk):
    gen = torch.Generator().manual_seed(50 + feature_dim)
    p = official_params(kv_heads, feature_dim, tied, gen)
    x = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, N, DIM, generator=gen, dtype=torch.float64)

    xo = leaf(x)
    y_off = official_forward(p, xo, kv_heads)
    (y_off * weight).sum().backward()

    attn = al.build("hedgehog", dim=DIM, heads=HEADS, kv_heads=kv_heads, head_dim=HD,
                    causal=True, rope=True, feature="softmax", feature_bias=False,
                    feature_dim=feature_dim, tie_qk=tied, chunk_size=chunk).double()
    compare_with_official(attn, p, NAMES, x, weight, y_off, xo)


def test_hedgehog_keeps_separate_query_and_key_maps_by_default():
    attn = al.build("hedgehog", dim=16, heads=4)
    assert attn.phi_k is not None and attn.phi_k is not attn.phi
    torch.testing.assert_close(attn.phi_k.weight, attn.phi.weight)  # equal at initialisation
    assert al.build("hedgehog", dim=16, heads=4, tie_qk=True).phi_k is None
