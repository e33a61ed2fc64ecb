"""Linear attention in its three forms: parallel, chunked and recurrent.

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (Katharopoulos et
al.); the dynamical-systems view of "Understanding the differences in Foundation Models:
Attention, State Space Models, and Recurrent Neural Networks": with S_i = S_{i-1} + phi(k_i) v_i^T
and z_i = z_{i-1} + phi(k_i) (Lambda = I),

    y_i = phi(q_i) S_i / phi(q_i) z_i        (normalize=False: y_i = phi(q_i) S_i)

The parallel form is the masked quadratic product, the chunked form the training default, the
recurrent form the decode step; all three agree and can continue from a state ``(S, z)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.masks import visibility
from attnlab.ops.common import expand_kv, guarded_op, upcast
from attnlab.ops.dispatch import choose

BACKENDS = ("triton", "chunked", "recurrent", "parallel")  # preference order for "auto"
OPTIONS = {"chunk_size": Arg("int", low=1), "eps": Arg("float", low=0)}  # checked per call
LinearState = tuple[Tensor, Tensor]  # S (B, H, Dk, Dv), z (B, H, Dk)


def elu_plus_one(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": elu_plus_one,
    "relu": F.relu,
    "identity": lambda x: x,
}


def safe_divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """num / den with |den| kept >= eps; a row with no visible key (num = den = 0) is 0, also
    with eps = 0."""
    den = torch.where(den >= 0, den.clamp_min(eps), den.clamp_max(-eps))
    return num / torch.where(den == 0, 1.0, den).unsqueeze(-1)


def pads_keys_only(mask: Tensor | None) -> bool:
    """Whether an op-level mask is key padding, (B or 1, 1, 1, Lk), or absent."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)


@overload
def key_padding_only(op: str, mask: Tensor, batch: int, lk: int) -> Tensor: ...
@overload
def key_padding_only(op: str, mask: Tensor | None, batch: int, lk: int) -> Tensor | None: ...
def key_padding_only(op: str, mask: Tensor | None, batch: int, lk: int) -> Tensor | None:
    """(B, Lk) bool from an op-level mask that only pads keys, for the factorised forms."""
    if mask is None:
        return None
    if not pads_keys_only(mask):
        raise ValueError(f"{op}: the chunked and recurrent forms take a key padding mask "
                         f"(B, 1, 1, Lk); got {tuple(mask.shape)} (use backend='parallel')")
    return mask[:, 0, 0].expand(batch, lk)


def _check_state(op: str, state: object, q: Tensor, v: Tensor, feature_dim: int | None) -> None:
    """A state must be the (S, z) of ``return_state=True`` for this batch and these heads: S
    (B, H, Dk, Dv), z (B, H, Dk) (a state of another batch size or head count broadcast
    silently, others failed inside torch)."""
    b, h, dv = q.shape[0], q.shape[1], v.shape[-1]
    dk = "Dk" if feature_dim is None else feature_dim
    want = f"(S, z) with S ({b}, {h}, {dk}, {dv}) and z ({b}, {h}, {dk})"
    ok = (isinstance(state, (tuple, list)) and len(state) == 2
          and all(isinstance(t, Tensor) for t in state))
    if ok:
        s, z = cast(LinearState, state)
        ok = (s.dim() == 4 and z.dim() == 3 and tuple(s.shape[:2]) == (b, h)
              and tuple(z.shape[:2]) == (b, h) and s.shape[3] == dv and s.shape[2] == z.shape[2]
              and (feature_dim is None or s.shape[2] == feature_dim))
    if not ok:
        got = (tuple(tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                     for t in state) if isinstance(state, (tuple, list))
               else type(state).__name__)
        raise ValueError(f"{op}: state must be {want} (from return_state=True on inputs of "
                         f"this batch and these heads), got {got}")


def empty_state(q: Tensor, v: Tensor) -> LinearState:
    b, h, _, dk = q.shape
    return (q.new_zeros(b, h, dk, v.shape[-1]), q.new_zeros(b, h, dk))


def _parallel(fq, fk, v, causal, mask, state):
    a = fq @ fk.transpose(-1, -2)
    vis = visibility(fq.shape[2], fk.shape[2], causal=causal, mask=mask, device=fq.device)
    if vis is not None:
        a = a.masked_fill(~vis, 0.0)
    s0, z0 = state
    num = a @ v + fq @ s0
    den = a.sum(-1) + (fq * z0.unsqueeze(2)).sum(-1)
    return num, den


# the triton form's chunks: powers of two >= 16 (tl.dot); 128 is left out: at head dim 128
# its state kernels need 264 KB of shared memory on sm_90 (an H100 has 227 KB)
TRITON_CHUNKS = (16, 32, 64)
TRITON_MAX_HEAD_DIM = 128  # its (Dk x Dv) fp32 state is one tile of a program
GROUP = 4096  # tokens whose chunks are computed together (the chunked form's unit of work)


def _chunked(fq, fk, v, causal, state, chunk):
    """The chunked form: the causal part within each chunk as a (C x C) product, the part
    before it from the state that the earlier chunks leave. The chunks of ``GROUP`` tokens
    are computed together, with an exclusive prefix sum of their (Dk x Dv) key-value sums:
    one chunk per step was launch-bound on a GPU (0.02x of SDPA at 4k), the whole sequence
    at once too slow on a CPU from 16k (the per-chunk states leave its caches)."""
    s, z = state
    if not causal:
        s = s + fk.transpose(-1, -2) @ v
        z = z + fk.sum(2)
        return fq @ s, (fq * z.unsqueeze(2)).sum(-1), (s, z)
    nums, dens = [], []
    step = max(chunk, GROUP // chunk * chunk)
    # split, not slicing: a slice's backward writes a full-length gradient per piece (O(L^2))
    for q_g, k_g, v_g in zip(fq.split(step, 2), fk.split(step, 2), v.split(step, 2),
                             strict=True):
        num, den, (s, z) = _chunk_group(q_g, k_g, v_g, s, z, chunk)
        nums.append(num)
        dens.append(den)
    return torch.cat(nums, 2), torch.cat(dens, 2), (s, z)


def _chunk_group(fq, fk, v, s, z, chunk):
    """Causal sums of a group of chunks at once, after the state (s, z)."""
    length = fq.shape[2]
    pad = -length % chunk  # zero rows: padded keys add nothing, padded queries are cut off
    q_c, k_c, v_c = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, chunk)) for t in (fq, fk, v))
    a = (q_c @ k_c.transpose(-1, -2)).tril()  # (B, H, n, C, C)
    kv, k_sum = k_c.transpose(-1, -2) @ v_c, k_c.sum(3)  # each chunk's sums
    s_before = s.unsqueeze(2) + _exclusive_cumsum(kv)  # (B, H, n, Dk, Dv)
    z_before = z.unsqueeze(2) + _exclusive_cumsum(k_sum)  # (B, H, n, Dk)
    num = a @ v_c + q_c @ s_before
    den = a.sum(-1) + (q_c @ z_before.unsqueeze(-1)).squeeze(-1)
    new = (s + kv.sum(2), z + k_sum.sum(2))
    return num.flatten(2, 3)[:, :, :length], den.flatten(2, 3)[:, :, :length], new


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """Sums over the chunks before each chunk (dim 2), 0 for the first."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], 2).cumsum(2)


def _recurrent(fq, fk, v, causal, state):
    s, z = state
    if not causal:
        return _chunked(fq, fk, v, False, state, 1)
    nums, dens = [], []
    for q_t, k_t, v_t in zip(fq.unbind(2), fk.unbind(2), v.unbind(2), strict=True):
        s = s + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        z = z + k_t
        nums.append((q_t.unsqueeze(-2) @ s).squeeze(-2))
        dens.append((q_t * z).sum(-1))
    return torch.stack(nums, 2), torch.stack(dens, 2), (s, z)


@guarded_op("linear_attention", options={
    **OPTIONS, "normalize": Arg("bool"), "return_state": Arg("bool")})
def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                     mask: Tensor | None = None, backend: str = "auto",
                     feature_map: str | Callable[[Tensor], Tensor] = "elu",
                     normalize: bool = True, chunk_size: int = 64,
                     state: tuple[Tensor, ...] | None = None, return_state: bool = False,
                     eps: float = 1e-6):
    """Linear attention on (B, H, L, D) tensors (k, v may have fewer heads: GQA).

    Backends (the three forms, which agree, and a kernel): ``triton`` (the chunked form in
    Triton kernels, ``ops/triton/linear.py``, forward and backward: CUDA, or the CPU under
    Triton's interpreter; by name only for now; no ``state``/``return_state``, key padding
    masks only, float16/bfloat16/float32, ``chunk_size`` in 16/32/64, head dims up to
    128), ``chunked`` (the default; chunks of ``chunk_size`` with a running state),
    ``recurrent`` (token by token), ``parallel`` (masked quadratic; the only one for a mask
    that is not key padding, and for causal calls with fewer queries than keys and no state).
    ``auto`` takes ``parallel`` when the keys fit in one chunk (the same product without the
    chunk bookkeeping: forward + backward 2.4x faster at L = 32 on a CPU,
    ``benchmarks/results/linear-one-chunk-cpu.md``).
    ``causal`` aligns queries to the end of the keys.
    ``mask``: bool, True = may attend; key padding (B, 1, 1, Lk) for every backend, any
    broadcastable mask for ``parallel``. ``state=(S, z)`` continues a causal sequence whose
    earlier keys it summarises; ``return_state=True`` returns ``(out, (S, z))`` with this
    call's keys added. There is no ``scale``: the feature map replaces the scores.
    ``backend="reference"`` (the name every op takes) is the ``parallel`` form: the equation
    as written, phi(Q) phi(K)^T V with the mask, normalised row by row.
    """
    op = "linear_attention"
    if backend not in ("auto", "reference", *BACKENDS):
        raise ValueError(f"{op}: unknown backend {backend!r}; choose from "
                         f"{('auto', 'reference', *BACKENDS)} ('reference' is 'parallel')")
    backend = "parallel" if backend == "reference" else backend
    if (state is not None or return_state) and not causal:
        raise ValueError(f"{op}: states summarise a causal prefix; pass causal=True")
    if state is not None:
        _check_state(op, state, q, v, feature_dim=q.shape[-1] if isinstance(feature_map, str)
                     else None)
    if causal and q.shape[2] != k.shape[2] and state is not None:
        raise ValueError(f"{op}: a causal call with a state needs as many queries as keys "
                         f"(the state holds the earlier keys), got {q.shape[2]} and "
                         f"{k.shape[2]}")

    def limits(name: str) -> str | None:
        if name == "parallel":
            return None
        if name == "triton":
            reason = triton_limits()
            if reason is not None:
                return reason
        if not pads_keys_only(mask):
            return f"the {name} form takes a key padding mask (B, 1, 1, Lk) only"
        if causal and q.shape[2] != k.shape[2]:
            return (f"the causal {name} form needs as many queries as keys (or a state), got "
                    f"{q.shape[2]} and {k.shape[2]}")
        if backend == "auto" and k.shape[2] <= chunk_size:
            return (f"the keys fit in one chunk ({k.shape[2]} <= chunk_size {chunk_size}): "
                    "the parallel form is that chunk's product without the bookkeeping")
        return None

    def triton_limits() -> str | None:
        if state is not None or return_state:
            return "the triton form takes no state= and returns none (use backend='chunked')"
        if q.dtype == torch.float64:
            return "the triton form computes in float32 (float64: use backend='chunked')"
        if chunk_size not in TRITON_CHUNKS:
            return (f"the triton form takes chunk_size in {TRITON_CHUNKS} (tl.dot tiles), "
                    f"got {chunk_size}")
        if max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
            return (f"the triton form takes head dims up to {TRITON_MAX_HEAD_DIM} (its fp32 "
                    f"state tile), got q/k {q.shape[-1]} and v {v.shape[-1]}")
        return None

    form = choose(op, backend, BACKENDS, q, k, v, limits=limits)
    if form != "triton":  # the triton kernels index the kv head of each query head
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    phi = FEATURE_MAPS.get(feature_map) if isinstance(feature_map, str) else feature_map
    if phi is None or not callable(phi):
        raise ValueError(f"{op}: unknown feature_map {feature_map!r}; choose from "
                         f"{sorted(FEATURE_MAPS)} or pass a callable")
    dtype = v.dtype
    q, k, v = upcast(q, k, v)  # sums over L overflow float16 long before the output does
    fq, fk = phi(q), phi(k)
    keep = None
    if mask is not None and (form != "parallel" or return_state):
        keep = key_padding_only(op, mask, q.shape[0], k.shape[2])[:, None, :, None]
    start = empty_state(fq, v) if state is None else tuple(t.to(fq.dtype) for t in state)
    if form == "parallel":
        num, den = _parallel(fq, fk, v, causal, mask, start)
    if keep is not None:  # padded keys contribute nothing to sums or states
        fk, v = fk * keep.to(fk.dtype), v * keep.to(v.dtype)
    new: tuple[Tensor, ...] | None
    if q.shape[2] == 0:  # no token: the state passes through
        num, den, new = fq.new_zeros(*fq.shape[:3], v.shape[-1]), fq.new_zeros(fq.shape[:3]), start
    elif form == "parallel":
        new = (start[0] + fk.transpose(-1, -2) @ v, start[1] + fk.sum(2)) if causal else None
    elif form == "chunked":
        num, den, new = _chunked(fq, fk, v, causal, start, chunk_size)
    elif form == "triton":
        from attnlab.ops.triton.linear import linear_sums

        num, den = linear_sums(fq, fk, v, causal=causal, chunk=chunk_size)
    else:
        num, den, new = _recurrent(fq, fk, v, causal, start)
    out = (safe_divide(num, den, eps) if normalize else num).to(dtype)
    return (out, new) if return_state else out


PrefixState = tuple[LinearState, LinearState]


def prefix_sums(fq: Tensor, fk: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None,
                state: PrefixState | None = None, chunk_size: int = 64, backend: str = "auto"
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, PrefixState | None]:
    """Sums over the keys row i sees, for mechanisms built from them (MALA, InLine):

    A_i = fq_i . sum_j fk_j v_j^T,  d_i = fq_i . sum_j fk_j,  V_i = sum_j v_j,  N_i = #keys.
    ``fq``, ``fk`` are already feature-mapped. The sums are float32 at least (the caller casts
    its result back). Returns (A, d, V, N, new state); the state has
    a fixed size, (Dk x (Dv + 1)) + (1 x (Dv + 1)) numbers per head (None if not causal).
    """
    fq, fk, v = upcast(fq, fk, v)  # the sums stay in float32 at least
    v_aug = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    ones_q = fq.new_ones(*fq.shape[:-1], 1)
    ones_k = fk.new_ones(*fk.shape[:-1], 1)
    kw: dict[str, Any]
    kw = dict(causal=causal, feature_map="identity", normalize=False, mask=mask, backend=backend,
              chunk_size=chunk_size, return_state=causal)
    s1, s2 = state if state is not None else (None, None)
    r1 = linear_attention(fq, fk, v_aug, state=s1, **kw)
    r2 = linear_attention(ones_q, ones_k, v_aug, state=s2, **kw)
    (ad, n1), (vn, n2) = (r1, r2) if causal else ((r1, None), (r2, None))
    new = cast(PrefixState, (n1, n2)) if causal else None
    return ad[..., :-1], ad[..., -1], vn[..., :-1], vn[..., -1], new
