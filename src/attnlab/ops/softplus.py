"""Length-scale softplus attention (LSSA) and its re-weighted form (LSSAR).

"Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models".
LSSA: A_ij = softplus(ln(d) ln(N_i) q̂_i.k̂_j) over the N_i visible keys, rows L1-normalised
(q̂, k̂: per-head L2-normalised). LSSAR: A <- relu(N_i A - 1)^p, L1-normalised again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.ops.common import (
    begin_weights,
    checked_weights,
    expand_kv,
    guarded_op,
    row_counts,
    tracing,
    upcast,
    visible_counts,
)
from attnlab.ops.dispatch import choose
from attnlab.ops.flex import flex_call
from attnlab.ops.tiled import BlockVisibility, RowMath, block_counts, row_tiled

# in order of preference for backend="auto" (which takes "triton" on CUDA only: see
# attnlab.ops.triton.why_not)
BACKENDS = ("triton", "flex", "tiled", "reference")

# The "- 1" of LSSAR is skipped for rows that see at most this many keys: for causal
# sequences without padding these are the first 3 rows, as in the paper.
FEW_KEYS = 3
_TINY = 1e-30


def _lssar_shift(n: Tensor) -> Tensor:
    """LSSAR's "- 1" per row of ``n`` visible keys, 0 for rows that see at most ``FEW_KEYS``,
    plus the rounding of a uniform row: there n a = 1 up to its normalisation's rounding
    (a = u / sum of n terms, then times n: at most (n + 2) u' with u' = eps / 2, in any
    summation order), so the margin 2 n eps makes a row that is uniform up to rounding fall
    back to its LSSA weights on every CPU. Without it, whether such a row's relu(n a - 1) is
    0 or one ulp depended on the order the CPU summed in, and with it the weights' gradient
    (LSSAR's da ~ p w / r is unbounded as r -> 0+)."""
    few = (n > FEW_KEYS).to(n.dtype)
    return few * (1.0 + 2.0 * torch.finfo(n.dtype).eps * n)


def _row_normalise(a: Tensor) -> Tensor:
    return a / a.sum(-1, keepdim=True).clamp_min(_TINY)


def length_scale(q: Tensor, scale: float | None) -> float:
    """The paper's ln(d) (d = head dim), the factor of ln(N_i) in alpha_i, unless given."""
    return math.log(q.shape[-1]) if scale is None else float(scale)


@checked_weights("softplus_weights", options={
    "reweight_p": Arg("float", optional=True, low=1)})
def softplus_weights(q: Tensor, k: Tensor, *, causal: bool = False, mask: Tensor | None = None,
                     scale: float | None = None, reweight_p: float | None = None) -> Tensor:
    """LSSA weights, then LSSAR re-weighting when ``reweight_p`` is given.

    Args:
        q: (B, H, Lq, D) queries; k: (B, H_kv, Lk, D) keys, H_kv dividing H (GQA).
        causal, mask: which keys each query sees, as in :func:`softplus_attention`.
        scale: c in alpha_i = c ln(N_i), default ln(D) (the paper's length scale).
        reweight_p: LSSAR's power p (None: LSSA).

    Returns (B, H, Lq, Lk) in float32 at least. A row whose re-weighted values are all 0
    (when its LSSA row is uniform, up to the rounding of its normalisation: see
    ``_lssar_shift``) keeps its LSSA weights; a row with no visible key is 0.
    """
    k, visible = begin_weights("softplus_weights", q, k, causal=causal, mask=mask)
    log_d = length_scale(q, scale)
    q, k = upcast(q, k)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    n = row_counts(visible, cos)
    alpha = log_d * torch.log(n.clamp_min(1.0))
    a = F.softplus(alpha * cos)
    if visible is not None:
        a = a.masked_fill(~visible, 0.0)
    a = _row_normalise(a)
    if reweight_p is None:
        return a
    r = torch.relu(a * n - _lssar_shift(n))
    r_max = r.amax(-1, keepdim=True)
    t = (r / r_max.clamp_min(_TINY)) ** reweight_p  # scale-free: (r / max r)^p cannot overflow
    z = t.sum(-1, keepdim=True)
    return torch.where(z > 0, t / z.clamp_min(_TINY), a)


class SoftplusRows(RowMath):
    """Tiled LSSA / LSSAR weights on cosine scores s = q̂.k̂, with their exact backward.

    LSSA: x = alpha_i s, u = softplus(x), a = u / z1. LSSAR: r = relu(n a - shift),
    t = (r / max r)^p, w = t / z2 (w = a where every r is 0). Backward, with gm = g - rowdot:
    LSSAR da = gm p w / r * n (r > 0); LSSA da = g; then du = (da - sum_j a da) / z1,
    ds = du sigmoid(x) alpha. The max r only rescales t, so it carries no gradient.
    softplus(x) = log1p(e^x) and sigmoid(x) = e^x / (1 + e^x) share one exp while e^x
    cannot overflow (|x| <= alpha < 80).
    """

    def __init__(self, log_d: float, reweight_p: float | None) -> None:
        self.log_d, self.p = log_d, reweight_p

    def weights(self, s: Tensor, vis: BlockVisibility | None):
        n = block_counts(vis, s)
        alpha = self.log_d * torch.log(n.clamp_min(1.0))
        x = s.mul_(alpha)
        if _exp_is_safe(alpha, self.log_d, s.shape[-1]):
            e = x.exp_()  # keep e^x: the backward's sigmoid(x) = e / (1 + e)
            a = torch.log1p(e)
        else:
            e, a = None, F.softplus(x)
        if vis is not None:
            vis.fill_(a, 0.0)
        z1 = a.sum(-1, keepdim=True)
        inv_z1 = 1.0 / torch.where(z1 > 0, z1, 1.0)
        a.mul_(inv_z1)
        aux = [x if e is None else e, e is not None, alpha, inv_z1, a, None, n]
        if self.p is None:
            return a, aux
        # r = relu(n a - shift) over its row's largest, max r = relu(n max a - shift) (n > 0);
        # the flush (a threshold) also zeroes the r <= 0
        shift = _lssar_shift(n)
        r_max = (n * a.amax(-1, keepdim=True)).sub_(shift).relu_()
        r_max = torch.where(r_max > 0, r_max, 1.0)
        base = _flush_((a * (n / r_max)).sub_(shift / r_max), self.p)
        w = _power_(base, self.p)
        z2 = w.sum(-1, keepdim=True)
        w.mul_(1.0 / torch.where(z2 > 0, z2, 1.0))
        rows = z2 == 0
        fallback: Tensor | None = None
        if tracing() or bool(rows.any()):  # traced: branch-free (a no-op where none)
            w, fallback = torch.where(rows, a, w), rows
        aux[5] = (base, r_max, fallback)
        return w, aux

    def vjp(self, g, w, aux, vis, rowdot) -> Tensor:
        x_or_e, is_exp, alpha, inv_z1, a, r, n = aux
        du = g.sub_(rowdot)
        if self.p is not None:
            base, r_max, fallback = r
            # a fallback row has w = a: there da = g - rowdot (as g: sum_j a_j = 1)
            lssa_da = None if fallback is None else du.clone()
            # dw/dr = p w / r with r = base r_max; w = 0 exactly where base = 0 (outside
            # fallback rows), so w / max(base, tiny) is 0 there
            da = du.mul_(w).div_(base.clamp_min_(_TINY)).mul_(self.p * n / r_max)
            if lssa_da is not None:
                da = torch.where(fallback, lssa_da, da)
            du = da.sub_((a * da).sum(-1, keepdim=True))
        du.mul_(inv_z1 * alpha)
        if is_exp:  # sigmoid(x) = e / (1 + e)
            ds = du.mul_(x_or_e).div_(x_or_e.add_(1.0))
        else:
            ds = du.mul_(torch.sigmoid(x_or_e))
        return ds if vis is None else vis.fill_(ds, 0.0)


def _exp_is_safe(alpha: Tensor, log_d: float, keys: int) -> bool:
    """Whether e^x of the scores x = alpha s (|s| <= 1) cannot overflow: every alpha < 80.
    Eagerly the largest alpha is read; traced (``torch.compile``, ``torch.export``), where
    reading it would break the graph, its bound from the row's at most ``keys`` keys,
    alpha <= log_d ln(keys) (the same choice except where that bound reaches 80, e.g.
    2e10 keys at the default log_d = ln 32; both choices compute softplus)."""
    if not tracing():
        return float(alpha.max()) < 80.0
    return log_d <= 0 or keys < math.exp(min(80.0 / log_d, 700.0))


def _flush_(t: Tensor, p: float) -> Tensor:
    """Zero the t in [0, 1] of a tile's rows whose weight t^p / sum t^p (the sum between 1 and
    the row's n <= Lk keys) could be subnormal in float32 (< 2^-126): t^p < Lk 2^-126, a weight
    below Lk 2^-126 times the row's largest (2^-114 at Lk = 4096). Subnormal operands make the
    elementwise passes and the GEMMs that read them many times slower (LSSAR training at
    L = 4096: 1060 -> 850 ms). float64 rows are flushed alike: the loss is as small."""
    return torch.threshold_(t, 2.0 ** ((math.log2(t.shape[-1]) - 126.0) / p), 0.0)


def _power_(t: Tensor, p: float) -> Tensor:
    """t ** p in place for t >= 0: repeated squaring for integer p, else exp(p log t)."""
    if float(p).is_integer() and 1 <= p <= 64:
        p, result, base = int(p), None, t
        while p:
            if p & 1:
                result = base.clone() if result is None else result.mul_(base)
            p >>= 1
            if p:
                base = base * base if base is t else base.mul_(base)
        assert result is not None  # p >= 1 has a set bit
        return result
    return t.log_().mul_(p).exp_()


def _log_softplus(x: Tensor) -> Tensor:
    return torch.where(x < -15.0, x, torch.log(F.softplus(x)))


def _flex(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, mask: Tensor | None,
          log_d: float, reweight_p: float | None) -> Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    n = visible_counts(lq, lk, causal=causal, mask=mask, device=q.device).to(torch.float32)
    n = n.expand(b, h, lq, 1)[..., 0]  # (B, H, Lq)
    alpha = log_d * torch.log(n.clamp_min(1.0))
    qn, kn = (F.normalize(t, dim=-1).to(q.dtype) for t in upcast(q, k))

    def lssa(s, bi, hi, i, j):
        return _log_softplus(alpha[bi, hi, i] * s)

    out1, lse1 = flex_call(qn, kn, v, causal=causal, mask=mask, score_mod=lssa, scale=1.0,
                           return_lse=True)
    if reweight_p is None:
        return out1
    shift = _lssar_shift(n)

    def lssar(s, bi, hi, i, j):
        y = torch.exp(lssa(s, bi, hi, i, j) - lse1[bi, hi, i]) * n[bi, hi, i] - shift[bi, hi, i]
        return torch.where(y > 0, reweight_p * torch.log(y.clamp_min(_TINY)), float("-inf"))

    out2, lse2 = flex_call(qn, kn, v, causal=causal, mask=mask, score_mod=lssar, scale=1.0,
                           return_lse=True)
    ok = torch.isfinite(lse2).unsqueeze(-1)
    return torch.where(ok, out2.nan_to_num(0.0), out1)


@guarded_op("softplus_attention", options={
    "reweight_p": Arg("float", optional=True, low=1)})
def softplus_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                       mask: Tensor | None = None, scale: float | None = None,
                       reweight_p: float | None = None, backend: str = "auto",
                       block_size: int | None = None) -> Tensor:
    """LSSA (``reweight_p=None``) or LSSAR attention on (B, H, L, D) tensors.

    ``q`` (B, H, Lq, D), ``k``, ``v`` (B, H_kv, Lk, D) with H_kv dividing H (GQA); ``causal``
    aligns queries to the end of the keys; ``mask`` bool, True = may attend, broadcastable to
    (B, H, Lq, Lk); ``scale`` is c in alpha_i = c ln(N_i), default ln(D). Returns
    (B, H, Lq, Dv). Backends: ``reference`` (dense), ``tiled`` (memory-bounded forward and
    backward, the CPU default), ``flex`` (two FlexAttention passes; the second re-weights
    with the first's lse), ``triton`` (``attnlab.ops.triton.softplus``: forward and backward
    Triton kernels with float32 row statistics, on CUDA or under Triton's interpreter; the
    kernel chooses its own tiles, so it takes no ``block_size``).
    """
    if reweight_p is not None and reweight_p < 1:
        raise ValueError(f"softplus_attention: reweight_p must be >= 1, got {reweight_p}")
    log_d = length_scale(q, scale)
    name = choose("softplus_attention", backend, BACKENDS, q, k, v,
                  limits=lambda n: _triton_limits(q, k, v, mask, reweight_p, block_size)
                  if n == "triton" else None)
    if name == "triton":  # GQA kv heads indexed in the kernels, never repeated
        from attnlab.ops.triton.softplus import softplus_attention_triton

        return softplus_attention_triton(q, k, v, causal=causal, mask=mask, log_d=log_d,
                                         reweight_p=reweight_p)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if name == "reference":
        w = softplus_weights(q, k, causal=causal, mask=mask, scale=log_d, reweight_p=reweight_p)
        return w.to(v.dtype) @ v
    if name == "tiled":
        # normalise in float32 at least: a bf16 cosine errs by ~4e-3, which LSSAR's power
        # (p = 15) turned into 10x the error of the reference computed in bf16
        qn, kn = (F.normalize(t, dim=-1) for t in upcast(q, k))
        out = row_tiled(SoftplusRows(log_d, reweight_p), qn, kn, v.to(qn.dtype),
                        causal=causal, mask=mask, block_size=block_size)
        return out.to(v.dtype)
    if reweight_p is not None and q.dtype in (torch.float16, torch.bfloat16):
        # LSSAR raises weights to the p-th power, which multiplies the kernel's bf16 score
        # error by p: on an H200, bf16 flex erred 5-7x the reference computed in bf16
        out = _flex(*upcast(q, k, v), causal=causal, mask=mask, log_d=log_d,
                    reweight_p=reweight_p)
        return out.to(v.dtype)
    return _flex(q, k, v, causal=causal, mask=mask, log_d=log_d, reweight_p=reweight_p)


def _triton_limits(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                   reweight_p: float | None, block_size: int | None) -> str | None:
    """Why the triton kernels cannot serve this call (asked only once triton is known to
    import: the dispatcher's general conditions come first)."""
    if block_size is not None:
        return "the triton kernels choose their own tiles: leave block_size unset"
    from attnlab.ops.triton.softplus import triton_limits

    return triton_limits(q, k, v, mask, reweight_p)
