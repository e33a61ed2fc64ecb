"""Shared op cases: every op with its non-reference backends and per-dtype tolerances."""

from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnlab.ops import sigmoid_attention, softmax_attention, softplus_attention

from ..device import DEVICE

# name -> (op with fixed kwargs, fast backends tested against the reference)
OPS = {
    "softmax": (softmax_attention, ("sdpa",)),
    "sigmoid": (sigmoid_attention, ("tiled",)),
    "lssa": (partial(softplus_attention, reweight_p=None), ("tiled",)),
    "lssar": (partial(softplus_attention, reweight_p=15.0), ("tiled",)),
}

# absolute / relative tolerance per dtype, against a float64 reference
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
# LSSAR raises weights to the 15th power, which multiplies relative errors by about 15
TOL_LSSAR = {torch.float32: (3e-4, 1e-3), torch.bfloat16: (1.5e-1, 1e-1)}


if DEVICE.type == "cuda":  # FlexAttention is a fast backend there
    OPS = {name: (op, (*fast, "flex")) for name, (op, fast) in OPS.items()}


def tolerance(op_name, dtype):
    return (TOL_LSSAR if op_name == "lssar" else TOL)[dtype]


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def saved_bytes_beyond(inputs, fn):
    """Bytes autograd keeps for the backward of ``fn()``, not counting the inputs' storage."""
    known = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def make_qkv(b, h, hkv, lq, lk, d, dtype, requires_grad=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def key_padding(b, lk, seed=1, device="cpu"):
    """(B, 1, 1, Lk) with a few padded keys per row; the first row is left-padded."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, lk, generator=g) > 0.2
    keep[0, : max(1, lk // 3)] = False  # left padding: early causal rows see nothing
    return keep[:, None, None, :].to(device)

# the random-feature op joins the tiled-vs-reference checks with its smooth activations;
# relu (a kink at 0, where fp32 and float64 scores may differ in sign, and rows that may be
# all zero) is checked in float64 in test_rfa.py
from attnlab.ops.rfa import random_feature_attention  # noqa: E402

for _act in ("sigmoid", "tanh"):
    OPS[f"rfa_{_act}"] = (partial(random_feature_attention, activation=_act), ("tiled",))
