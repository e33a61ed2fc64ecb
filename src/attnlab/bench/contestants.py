"""The contestants: attnlab's fast paths and the peers' implementations of the same math.

A contestant turns a workload's shared inputs into a forward closure (the harness adds the
backward for training). ``why_not`` says, before anything is built, why a contestant cannot
run a workload (a missing peer, no CPU backward, a dense matrix over the memory limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.bench.peers import peer_missing
from attnlab.bench.workload import Workload
from attnlab.ops.flex import block_mask_of, compiled_flex

Forward = Callable[[], Tensor]


@dataclass(frozen=True)
class Contestant:
    name: str  # "<math>/<implementation>", e.g. "sigmoid/attnlab", "sigmoid/flex"
    peer: str  # the package it comes from (attnlab, torch, flex, natten, fla, x-transformers)
    prepare: Callable[[Workload, dict], tuple[Forward, list[Tensor]]]  # -> forward, extra leaves
    dense: bool = False  # holds B * H * L * L_k scores at once
    needs_backward_on_cpu: bool = True  # False: no CPU backward (FlexAttention)
    modes: tuple[str, ...] = ("train", "inference")
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] = ("fp32", "bf16")

    def why_not(self, w: Workload, memory_limit_bytes: float) -> str | None:
        """None when this contestant can run ``w``, else the reason it is not run."""
        missing = peer_missing(self.peer)
        if missing:
            return missing
        if w.mode not in self.modes:
            return f"{self.name} has no {w.mode} path"
        if w.device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)} only"
        if w.dtype not in self.dtypes:
            return f"{self.name} is for {', '.join(self.dtypes)} only"
        if w.train and w.device == "cpu" and not self.needs_backward_on_cpu:
            return "FlexAttention has no backward on CPU"
        if self.dense:
            scores = w.batch * w.heads * w.length * w.length * 4  # float32 scores
            held = scores * (3 if w.train else 2)  # scores, weights (and their gradient)
            if held > memory_limit_bytes:
                return (f"dense: holds ~{held / 2**30:.1f} GiB of (L, L) scores, over the "
                        f"{memory_limit_bytes / 2**30:.0f} GiB limit (--memory-limit)")
        return None


# --- FlexAttention (compiled) ------------------------------------------------------------

def block_mask(mask_mod: Callable, w: Workload, lq: int, lk: int):
    """Built once per workload, broadcast over batch and heads (outside the timed step)."""
    return block_mask_of(mask_mod, None, None, lq, lk, w.device)


def flex_softmax(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    mask = block_mask(lambda b, h, i, j: j <= i, w, w.length, w.length) if w.causal else None
    return (lambda: compiled_flex()(x["q"], x["k"], x["v"], block_mask=mask)), []


def flex_sigmoid(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    """sum_j sigmoid(s_ij + b) v_j with FlexAttention: ``score_mod`` returns log sigmoid, and
    the softmax normaliser Z_i = sum_j sigmoid(s_ij + b) is undone exactly. On CUDA through
    the log-sum-exp; on CPU (no log-sum-exp there) with one extra key of weight e^0 = 1 and
    value (0, ..., 0, 1): the last output channel is 1 / (Z_i + 1)."""
    q, k, v, length = x["q"], x["k"], x["v"], w.length
    bias = -math.log(length)
    causal = w.causal
    if w.device == "cuda":
        from torch.nn.attention.flex_attention import AuxRequest

        def score_lse(s, b, h, i, j):
            return F.logsigmoid(s + bias)

        mask = block_mask(lambda b, h, i, j: j <= i, w, length, length) if causal else None

        def forward_lse() -> Tensor:
            out, aux = compiled_flex()(q, k, v, score_mod=score_lse, block_mask=mask,
                                       return_aux=AuxRequest(lse=True))
            return out * aux.lse.exp().unsqueeze(-1).to(out.dtype)

        return forward_lse, []
    pad_k = torch.zeros(*k.shape[:2], 1, k.shape[-1], dtype=k.dtype, device=k.device)
    k_extra = torch.cat([k, pad_k], 2)
    v_extra = torch.cat([F.pad(v, (0, 1)), F.pad(torch.ones_like(v[:, :, :1, :1]),
                                                 (v.shape[-1], 0))], 2)

    def score(s, b, h, i, j):
        return torch.where(j == length, 0.0, F.logsigmoid(s + bias))

    def keep(b, h, i, j):
        return ((j <= i) if causal else (j >= 0)) | (j == length)

    mask = block_mask(keep, w, length, length + 1)

    def forward() -> Tensor:
        out = compiled_flex()(q, k_extra, v_extra, score_mod=score, block_mask=mask)
        return out[..., :-1] / out[..., -1:]

    return forward, []


def window_rule(length: int, kernel: int) -> Callable:
    """The 1-D neighborhood of attnlab (and NATTEN): keys [start, start + K) with start =
    clamp(i - K // 2, 0, L - K)."""
    def keep(b, h, i, j):
        start = torch.clamp(i - kernel // 2, 0, length - kernel)
        return (j >= start) & (j < start + kernel)

    return keep


def flex_neighborhood(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    mask = block_mask(window_rule(w.length, w.kernel), w, w.length, w.length)
    return (lambda: compiled_flex()(x["q"], x["k"], x["v"], block_mask=mask)), []


# --- torch and plain dense ----------------------------------------------------------------

def sdpa(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    return (lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                   is_causal=w.causal)), []


def sdpa_masked_neighborhood(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    from attnlab.ops import neighborhood_visibility

    mask = neighborhood_visibility((w.length,), kernel_size=w.kernel, device=w.device)
    return (lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                   attn_mask=mask)), []


def dense_sigmoid(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    q, k, v = x["q"], x["k"], x["v"]
    bias = -math.log(w.length)

    def forward() -> Tensor:
        weights = torch.sigmoid(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias)
        if w.causal:
            weights = weights.tril()
        return weights @ v

    return forward, []


def xt_sigmoid(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    from x_transformers.attend import Attend

    attend = Attend(causal=w.causal, sigmoid=True)
    return (lambda: attend(x["q"], x["k"], x["v"])[0]), []


# --- attnlab ops --------------------------------------------------------------------------

def attnlab_op(name: str, *, upcast: bool = False, **kwargs) -> Callable:
    """attnlab's op ``name``; ``upcast``: on float32 copies of the inputs (what the op did
    with bf16 inputs before it ran its GEMMs in bf16), cast back."""
    def prepare(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
        import attnlab.ops as ops

        op = getattr(ops, name)
        extra = {"kernel_size": w.kernel} if name == "neighborhood_attention" else {}
        if name != "neighborhood_attention":
            extra["causal"] = w.causal
        if upcast:
            return (lambda: op(*(x[n].float() for n in "qkv"), **extra, **kwargs).to(
                x["q"].dtype)), []
        return (lambda: op(x["q"], x["k"], x["v"], **extra, **kwargs)), []

    return prepare


# --- linear attention ---------------------------------------------------------------------

def fla_linear(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    """fla's chunk kernel on the same math as attnlab's linear_attention(feature_map="elu"):
    phi = elu + 1 on q and k, causal, normalised."""
    from fla.ops.linear_attn import chunk_linear_attn

    def forward() -> Tensor:
        q, k = (F.elu(t) + 1 for t in (x["q"], x["k"]))
        out, _ = chunk_linear_attn(*(t.transpose(1, 2) for t in (q, k, x["v"])),
                                   normalize=True)
        return out.transpose(1, 2)

    return forward, []


# --- decode -------------------------------------------------------------------------------

def plain_decode(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    """One batched matmul over the cache for the scores, softmax, one for the output (the
    GQA query heads of a kv head are rows of one matmul, nothing copied)."""
    q, k, v = x["q"], x["k"], x["v"]
    b, h, lq, d = q.shape
    h_kv = k.shape[1]

    def forward() -> Tensor:
        rows = q.reshape(b, h_kv, h // h_kv * lq, d)
        weights = torch.softmax(rows @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
        return (weights @ v).reshape(b, h, lq, -1)

    return forward, []


def sdpa_repeat_kv(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    groups = w.heads // w.kv_heads

    def forward() -> Tensor:
        k, v = (t.repeat_interleave(groups, 1) for t in (x["k"], x["v"]))
        return F.scaled_dot_product_attention(x["q"], k, v)

    return forward, []


def sdpa_gqa(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
    return (lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                   enable_gqa=True)), []


# --- modules ------------------------------------------------------------------------------

def attnlab_module(name: str, **kwargs) -> Callable:
    def prepare(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
        import attnlab as al

        attn = al.build(name, dim=w.dim, heads=w.heads, causal=w.causal, **kwargs)
        attn = attn.to(w.device).train(w.train)
        if w.dtype == "bf16":
            def forward() -> Tensor:
                with torch.autocast(w.device, dtype=torch.bfloat16):
                    return attn(x["x"])
        else:
            def forward() -> Tensor:
                return attn(x["x"])
        return forward, list(attn.parameters())

    return prepare


OPS = {  # name -> Contestant, for the op groups
    "softmax/sdpa": Contestant("softmax/sdpa", "torch", sdpa),
    "softmax/flex": Contestant("softmax/flex", "flex", flex_softmax,
                               needs_backward_on_cpu=False),
    "softmax/attnlab-reference": Contestant("softmax/attnlab-reference", "attnlab",
                                            attnlab_op("softmax_attention",
                                                       backend="reference"), dense=True),
    "sigmoid/attnlab": Contestant("sigmoid/attnlab", "attnlab", attnlab_op("sigmoid_attention")),
    "sigmoid/attnlab-triton": Contestant("sigmoid/attnlab-triton", "attnlab",
                                         attnlab_op("sigmoid_attention", backend="triton"),
                                         devices=("cuda",)),
    "sigmoid/attnlab-fp32-gemm": Contestant("sigmoid/attnlab-fp32-gemm", "attnlab",
                                            attnlab_op("sigmoid_attention", upcast=True),
                                            dtypes=("bf16",)),
    "sigmoid/flex": Contestant("sigmoid/flex", "flex", flex_sigmoid,
                               needs_backward_on_cpu=False),
    "sigmoid/x-transformers": Contestant("sigmoid/x-transformers", "x-transformers",
                                         xt_sigmoid, dense=True),
    "sigmoid/dense": Contestant("sigmoid/dense", "torch", dense_sigmoid, dense=True),
    "lssa/attnlab": Contestant("lssa/attnlab", "attnlab", attnlab_op("softplus_attention")),
    "lssar/attnlab": Contestant("lssar/attnlab", "attnlab",
                                attnlab_op("softplus_attention", reweight_p=15.0)),
    "lssa/attnlab-triton": Contestant("lssa/attnlab-triton", "attnlab",
                                      attnlab_op("softplus_attention", backend="triton"),
                                      devices=("cuda",)),
    "lssar/attnlab-triton": Contestant("lssar/attnlab-triton", "attnlab",
                                       attnlab_op("softplus_attention", reweight_p=15.0,
                                                  backend="triton"), devices=("cuda",)),
    # SDPA's CPU and CUDA kernels tile a boolean mask: only the (L, L) mask itself is dense
    "neighborhood/sdpa-masked": Contestant("neighborhood/sdpa-masked", "torch",
                                           sdpa_masked_neighborhood),
    "neighborhood/attnlab": Contestant("neighborhood/attnlab", "attnlab",
                                       attnlab_op("neighborhood_attention")),
    "neighborhood/attnlab-triton": Contestant("neighborhood/attnlab-triton", "attnlab",
                                              attnlab_op("neighborhood_attention",
                                                         backend="triton"),
                                              devices=("cuda",)),
    "neighborhood/flex": Contestant("neighborhood/flex", "flex", flex_neighborhood,
                                    needs_backward_on_cpu=False),
    "neighborhood/natten": Contestant(
        "neighborhood/natten", "natten",
        lambda w, x: (lambda: __import__("natten").na1d(
            *(t.transpose(1, 2) for t in (x["q"], x["k"], x["v"])),
            kernel_size=w.kernel).transpose(1, 2), []),
        needs_backward_on_cpu=False),  # NATTEN's CPU path is FlexAttention, inference only
    "linear/attnlab": Contestant("linear/attnlab", "attnlab",
                                 attnlab_op("linear_attention", feature_map="elu")),
    "linear/attnlab-triton": Contestant("linear/attnlab-triton", "attnlab",
                                        attnlab_op("linear_attention", feature_map="elu",
                                                   backend="triton"), devices=("cuda",)),
    "linear/fla": Contestant("linear/fla", "fla", fla_linear, devices=("cuda",)),
    "decode/attnlab": Contestant("decode/attnlab", "attnlab", attnlab_op("decode_attention"),
                                 modes=("inference",)),
    "decode/attnlab-triton": Contestant("decode/attnlab-triton", "attnlab",
                                        attnlab_op("decode_attention", backend="triton"),
                                        modes=("inference",), devices=("cuda",)),
    "decode/matmul": Contestant("decode/matmul", "torch", plain_decode, modes=("inference",)),
    "decode/sdpa-repeat-kv": Contestant("decode/sdpa-repeat-kv", "torch", sdpa_repeat_kv,
                                        modes=("inference",)),
    "decode/sdpa-gqa": Contestant("decode/sdpa-gqa", "torch", sdpa_gqa, modes=("inference",)),
}

# "L/8", "L": the setting scales with the length (sparsifiner's official predictor has a basis
# over a fixed token count, which must cover the length)
MODULE_SETTINGS = {"dma": {"window": "L/8"}, "sparsifiner": {"tokens": "L"}}
_BY_LENGTH = {"L/8": lambda n: n // 8, "L": lambda n: n}


def module_contestant(name: str) -> Contestant:
    def prepare(w: Workload, x: dict) -> tuple[Forward, list[Tensor]]:
        kwargs = {k: _BY_LENGTH[v](w.length) if isinstance(v, str) and v in _BY_LENGTH else v
                  for k, v in MODULE_SETTINGS.get(name, {}).items()}
        return attnlab_module(name, **kwargs)(w, x)

    return Contestant(f"{name}/attnlab", "attnlab", prepare)
