"""Length-scale softplus attention (LSSA) and its re-weighted form (LSSAR) in Triton: the
kernels behind ``softplus_attention(..., backend="triton")``.

Math, for query row i of head h (kv head h // G, G = H / H_kv), over the N_i keys it sees
(causal: j <= i + Lk - Lq; the op's bool mask), with q̂, k̂ the per-head L2-normalised
queries and keys (normalised in float32 in torch before the kernels, so autograd carries the
gradient through the normalisation)::

    s_ij = q̂_i . k̂_j,   alpha_i = log_d ln(max(N_i, 1)),   x_ij = alpha_i s_ij
    u_ij = softplus(x_ij),   z1_i = sum_j u_ij,   a_ij = u_ij / z1_i          (LSSA: w = a)
    r_ij = relu(N_i a_ij - shift_i),   rmax_i = max_j r_ij = relu(N_i max_j a_ij - shift_i)
    t_ij = (r_ij / rmax_i)^p,   z2_i = sum_j t_ij,   w_ij = t_ij / z2_i      (LSSAR)
    O_i = sum_j w_ij v_j

with shift_i LSSAR's "- 1" (0 for rows that see at most ``FEW_KEYS`` keys, plus the margin
2 N_i eps of ``attnlab.ops.softplus._lssar_shift``), w = a in a row whose r are all 0 (a
uniform row: z2 = 0) and O_i = 0 in a row that sees no key (z1 = 0). As in the reference,
z1 and rmax are clamped to at least 1e-30 (``_TINY``) where they divide.

Forward: one program per (query tile, batch, head) makes the passes over the key tiles its
rows see: (a mask only) the count N_i, then z1_i and max_j u_ij, then (LSSAR) z2_i, then the
output. It saves, per row, the float32 statistics (N_i, 1/z1_i, rmax_i, 1/z2_i) for the
backward, as flash softmax saves its log-sum-exp (1/z2_i = 0 marks a row that falls back to
its LSSA weights).

Backward, with g_ij = dO_i . v_j and Dw_i = sum_j w_ij g_ij = dO_i . O_i (from the output,
in torch)::

    LSSAR: da_ij = c_i tau_ij^(p-1) (g_ij - Dw_i) where r_ij > 0 (else 0),
           tau = r / rmax, c_i = p N_i / (rmax_i z2_i)     (dw/dr = p w / r, dr/da = N_i);
           a fallback row: da = g
    LSSA:  da = g
    Da_i = sum_j a_ij da_ij    (LSSA: Dw_i; LSSAR: a pass of the dQ kernel, stored)
    ds_ij = (da_ij - Da_i) / z1_i * sigmoid(x_ij) alpha_i,   dq̂_i = sum_j ds_ij k̂_j,
    dk̂_j = sum_i ds_ij q̂_i,   dv_j = sum_i w_ij dO_i

The dQ kernel (one program per query tile) writes dq̂ and Da; the dK/dV kernel (one program
per key tile and kv head) loops over the G query heads of its kv head and their query tiles,
so every gradient is written by one program (no atomics) and GQA's kv heads are indexed,
never repeated. Causal tiles past the diagonal are skipped. The mask, broadcastable to
(B, H, Lq, Lk), is read through its strides (0 on broadcast axes). Head dims are padded to
a power of two >= 16 with masked loads. Scores, statistics and gradients accumulate in
float32; w is rounded to v's dtype before its products with V and dO (as the reference rounds
its weights). softplus and sigmoid share one exp(-|x|), so no logit overflows.

The kernels are PyTorch custom ops (``attnlab::softplus_triton_fwd`` / ``_bwd``) with fake
implementations and a registered autograd formula, so a call traces under
``torch.compile(fullgraph=True)`` and ``torch.export``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from attnlab.ops.triton import interpreting
from attnlab.ops.triton.common import (
    input_limits,
    key_program,
    key_tile,
    mask_strides,
    padded,
    query_program,
    store_tile,
    tile,
    tile_t,
    visible,
)

# as attnlab.ops.softplus.FEW_KEYS (not imported: that module imports this one lazily)
FEW_KEYS = 3
MAX_HEAD_DIM = 128
_EPS32 = 2.0 ** -23  # torch.finfo(torch.float32).eps: _lssar_shift's margin in float32
_STATS = 4  # per row: N, 1 / z1, rmax, 1 / z2
TINY = tl.constexpr(1e-30)  # attnlab.ops.softplus._TINY: the clamp of z1, rmax


@triton.jit
def _softplus(x):
    """softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) <= 1 (no overflow), with log1p by
    Kahan's trick (log(1 + e) e / ((1 + e) - 1)), accurate where softplus(x) ~ e^x is tiny;
    also returns e for the sigmoid."""
    e = tl.exp(-tl.abs(x))
    one_e = 1.0 + e
    den = tl.where(one_e == 1.0, 1.0, one_e - 1.0)
    log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / den))
    return tl.maximum(x, 0.0) + log1p, e


@triton.jit
def _sigmoid(x, e):
    """sigmoid(x) from e = exp(-|x|)."""
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _power(t, p):
    """t^p for t >= 0 (0^p = 0, and t^0 = 1 for t > 0), base 2."""
    pos = t > 0
    return tl.where(pos, tl.exp2(p * tl.log2(tl.where(pos, t, 1.0))), 0.0)


@triton.jit
def _shift(n):
    """LSSAR's "- 1" of ``attnlab.ops.softplus._lssar_shift`` in float32."""
    return tl.where(n > 3.0, 1.0 + 2.0 * 1.1920928955078125e-07 * n, 0.0)


@triton.jit
def _logits(q, alpha, k_base, mask_base, start_n, offs_m, offs_d, skn, skd, smm, smn,
            Lq, Lk, D, off, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BN: tl.constexpr):
    """One key tile of a forward pass: its key indices, visibility and u = softplus(x)."""
    offs_n, kt = key_tile(k_base, start_n, offs_d, skn, skd, Lk, D, BN)
    vis = visible(offs_m[:, None], offs_n[None, :], Lq, Lk, off, mask_base, smm, smn, CAUSAL,
                  HAS_MASK)
    u, e = _softplus(alpha[:, None] * tl.dot(q, kt))
    return offs_n, vis, u


@triton.jit
def _fwd(Q, K, V, Mask, O, S,
         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
         sob, soh, som, soe, smb, smh, smm, smn, ssb, ssh, ssm,
         G, Lq, Lk, D, Dv, log_d, p,
         CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    (pid_m, b, h, offs_m, offs_d, offs_e, q, k_base, v_base, mask_base,
     off) = query_program(Q, K, V, Mask, sqb, sqh, sqm, sqd, skb, skh, svb, svh, smb, smh, G,
                          Lq, Lk, D, BM, BD, BE)
    rows = offs_m < Lq
    hi = Lk
    if CAUSAL:  # the last row of this tile sees keys < (pid_m + 1) BM + off
        hi = tl.maximum(tl.minimum((pid_m + 1) * BM + off, Lk), 0)
    # pass 0: the keys each row sees
    if HAS_MASK:
        n = tl.zeros((BM,), dtype=tl.float32)
        for start_n in range(0, hi, BN):
            offs_n = start_n + tl.arange(0, BN)
            vis = visible(offs_m[:, None], offs_n[None, :], Lq, Lk, off, mask_base, smm,
                          smn, CAUSAL, HAS_MASK)
            n += tl.sum(vis.to(tl.float32), axis=1)
    elif CAUSAL:
        n = tl.minimum(tl.maximum(offs_m + off + 1, 0), Lk).to(tl.float32)
    else:
        n = tl.zeros((BM,), dtype=tl.float32) + Lk
    n = tl.where(rows, n, 0.0)
    alpha = log_d * tl.log(tl.maximum(n, 1.0))
    # pass 1: z1 = sum_j u_ij and max_j u_ij
    z1 = tl.zeros((BM,), dtype=tl.float32)
    umax = tl.zeros((BM,), dtype=tl.float32)
    for start_n in range(0, hi, BN):
        offs_n, vis, u = _logits(q, alpha, k_base, mask_base, start_n, offs_m, offs_d, skn,
                                 skd, smm, smn, Lq, Lk, D, off, CAUSAL, HAS_MASK, BN)
        u = tl.where(vis, u, 0.0)
        z1 += tl.sum(u, axis=1)
        umax = tl.maximum(umax, tl.max(u, axis=1))
    # as the reference: u / max(z1, TINY) (0 in a row that sees no key)
    inv_z1 = 1.0 / tl.maximum(z1, TINY)
    shift = _shift(n)
    rmax = tl.zeros((BM,), dtype=tl.float32) + TINY
    inv_z2 = tl.zeros((BM,), dtype=tl.float32)
    if REWEIGHT:
        # pass 2: z2 = sum_j (r_ij / max(rmax_i, TINY))^p
        rmax = tl.maximum(n * (umax * inv_z1) - shift, TINY)
        z2 = tl.zeros((BM,), dtype=tl.float32)
        for start_n in range(0, hi, BN):
            offs_n, vis, u = _logits(q, alpha, k_base, mask_base, start_n, offs_m, offs_d,
                                     skn, skd, smm, smn, Lq, Lk, D, off, CAUSAL, HAS_MASK, BN)
            r = n[:, None] * (u * inv_z1[:, None]) - shift[:, None]
            tau = tl.where(vis & (r > 0), r / rmax[:, None], 0.0)
            z2 += tl.sum(_power(tau, p), axis=1)
        inv_z2 = tl.where(z2 > 0, 1.0 / tl.maximum(z2, TINY), 0.0)  # 0: falls back to a
    s_base = S + b * ssb + h * ssh + offs_m * ssm
    tl.store(s_base, n, mask=rows)
    tl.store(s_base + 1, inv_z1, mask=rows)
    tl.store(s_base + 2, rmax, mask=rows)
    tl.store(s_base + 3, inv_z2, mask=rows)
    # the weighted pass
    acc = tl.zeros((BM, BE), dtype=tl.float32)
    for start_n in range(0, hi, BN):
        offs_n, vis, u = _logits(q, alpha, k_base, mask_base, start_n, offs_m, offs_d, skn,
                                 skd, smm, smn, Lq, Lk, D, off, CAUSAL, HAS_MASK, BN)
        w = tl.where(vis, u * inv_z1[:, None], 0.0)
        if REWEIGHT:
            r = n[:, None] * w - shift[:, None]
            tau = tl.where(vis & (r > 0), r / rmax[:, None], 0.0)
            w = tl.where(inv_z2[:, None] > 0, _power(tau, p) * inv_z2[:, None], w)
        v = tile(v_base, offs_n, offs_n[:, None] < Lk, offs_e, svn, sve, Dv)
        acc += tl.dot(w.to(v.dtype), v)
    store_tile(O + b * sob + h * soh, acc.to(O.dtype.element_ty), offs_m, rows[:, None], offs_e,
               som, soe, Dv)


@triton.jit
def _weights_grad(x, vis, g, n, inv_z1, rmax, inv_z2, dw, p, REWEIGHT: tl.constexpr):
    """From the tile's logits x = alpha s and g = dO . v: the weights w, the LSSA weights a,
    da (before its normalisation's row term) and sigmoid(x). Row vectors are (rows, 1)-shaped
    or (1, rows)-shaped like the tile's rows."""
    u, e = _softplus(x)
    a = tl.where(vis, u * inv_z1, 0.0)
    w = a
    da = g
    if REWEIGHT:
        r = n * a - _shift(n)
        live = vis & (r > 0)
        tau = tl.where(live, r / rmax, 0.0)
        fallback = inv_z2 == 0
        w = tl.where(fallback, a, _power(tau, p) * inv_z2)
        c = p * n * inv_z2 / rmax
        da_r = tl.where(live, c * _power(tau, p - 1.0) * (g - dw), 0.0)
        da = tl.where(fallback, g, da_r)
    return w, a, da, _sigmoid(x, e)


@triton.jit
def _row_stats(S, DW, b, h, ssb, ssh, ssm, srb, srh, offs_m, Lq, log_d,
               COLUMNS: tl.constexpr):
    """The forward's statistics of the rows ``offs_m`` (N, 1/z1, rmax, 1/z2), their Dw and
    alpha, each shaped (rows, 1), or (1, rows) when the rows are the tile's COLUMNS."""
    rows = offs_m < Lq
    s_base = S + b * ssb + h * ssh + offs_m * ssm
    n = tl.load(s_base, mask=rows, other=0.0)
    inv_z1 = tl.load(s_base + 1, mask=rows, other=0.0)
    rmax = tl.load(s_base + 2, mask=rows, other=1.0)
    inv_z2 = tl.load(s_base + 3, mask=rows, other=0.0)
    dw = tl.load(DW + b * srb + h * srh + offs_m, mask=rows, other=0.0)
    if COLUMNS:
        n, inv_z1, rmax = n[None, :], inv_z1[None, :], rmax[None, :]
        inv_z2, dw = inv_z2[None, :], dw[None, :]
    else:
        n, inv_z1, rmax = n[:, None], inv_z1[:, None], rmax[:, None]
        inv_z2, dw = inv_z2[:, None], dw[:, None]
    alpha = log_d * tl.log(tl.maximum(n, 1.0))
    return n, inv_z1, rmax, inv_z2, dw, alpha


@triton.jit
def _dq_tile(q, do, alpha, k_base, v_base, mask_base, start_n, offs_m, offs_d, offs_e,
             skn, skd, svn, sve, smm, smn, Lq, Lk, D, Dv, off, n, inv_z1, rmax, inv_z2, dw,
             p, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr,
             BN: tl.constexpr):
    """One key tile of a dQ pass: K^T, the visibility, a, da and sigmoid(x) (BM, BN)."""
    offs_n, kt = key_tile(k_base, start_n, offs_d, skn, skd, Lk, D, BN)
    vt = tile_t(v_base, offs_n, offs_n[None, :] < Lk, offs_e, svn, sve, Dv)
    vis = visible(offs_m[:, None], offs_n[None, :], Lq, Lk, off, mask_base, smm, smn, CAUSAL,
                  HAS_MASK)
    w, a, da, sig = _weights_grad(alpha * tl.dot(q, kt), vis, tl.dot(do, vt), n, inv_z1,
                                  rmax, inv_z2, dw, p, REWEIGHT)
    return kt, vis, a, da, sig


@triton.jit
def _bwd_dq(Q, K, V, Mask, DO, S, DW, DA, DQ,
            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
            sdob, sdoh, sdom, sdoe, sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
            ssb, ssh, ssm, srb, srh,
            G, Lq, Lk, D, Dv, log_d, p,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    (pid_m, b, h, offs_m, offs_d, offs_e, q, k_base, v_base, mask_base,
     off) = query_program(Q, K, V, Mask, sqb, sqh, sqm, sqd, skb, skh, svb, svh, smb, smh, G,
                          Lq, Lk, D, BM, BD, BE)
    rows = offs_m < Lq
    do = tile(DO + b * sdob + h * sdoh, offs_m, rows[:, None], offs_e, sdom, sdoe, Dv)
    n, inv_z1, rmax, inv_z2, dw, alpha = _row_stats(S, DW, b, h, ssb, ssh, ssm, srb, srh,
                                                    offs_m, Lq, log_d, False)
    hi = Lk
    if CAUSAL:
        hi = tl.maximum(tl.minimum((pid_m + 1) * BM + off, Lk), 0)
    da_row = dw
    if REWEIGHT:  # a first pass for Da_i = sum_j a_ij da_ij
        da_sum = tl.zeros((BM,), dtype=tl.float32)
        for start_n in range(0, hi, BN):
            kt, vis, a, da, sig = _dq_tile(q, do, alpha, k_base, v_base, mask_base, start_n,
                                           offs_m, offs_d, offs_e, skn, skd, svn, sve, smm,
                                           smn, Lq, Lk, D, Dv, off, n, inv_z1, rmax, inv_z2,
                                           dw, p, CAUSAL, HAS_MASK, REWEIGHT, BN)
            da_sum += tl.sum(a * da, axis=1)
        tl.store(DA + b * srb + h * srh + offs_m, da_sum, mask=rows)
        da_row = da_sum[:, None]
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    for start_n in range(0, hi, BN):
        kt, vis, a, da, sig = _dq_tile(q, do, alpha, k_base, v_base, mask_base, start_n,
                                       offs_m, offs_d, offs_e, skn, skd, svn, sve, smm, smn,
                                       Lq, Lk, D, Dv, off, n, inv_z1, rmax, inv_z2, dw, p,
                                       CAUSAL, HAS_MASK, REWEIGHT, BN)
        ds = tl.where(vis, (da - da_row) * inv_z1 * sig * alpha, 0.0)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    store_tile(DQ + b * sdqb + h * sdqh, dq.to(DQ.dtype.element_ty), offs_m, rows[:, None], offs_d,
               sdqm, sdqd, D)


@triton.jit
def _bwd_dkdv(Q, K, V, Mask, DO, S, DW, DA, DK, DV,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
              sdob, sdoh, sdom, sdoe, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdve,
              smb, smh, smm, smn, ssb, ssh, ssm, srb, srh,
              G, Lq, Lk, D, Dv, log_d, p,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, REWEIGHT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    pid_n, b, hk, offs_n, offs_d, offs_e, k, v, off, lo = key_program(
        K, V, skb, skh, skn, skd, svb, svh, svn, sve, Lq, Lk, D, Dv, CAUSAL, BM, BN, BD, BE)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dv = tl.zeros((BN, BE), dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = Mask + b * smb + h * smh
        for start_m in range(lo, Lq, BM):
            offs_m = start_m + tl.arange(0, BM)
            rows = offs_m < Lq
            qt = tile_t(q_base, offs_m, rows[None, :], offs_d, sqm, sqd, D)
            do = tile(do_base, offs_m, rows[:, None], offs_e, sdom, sdoe, Dv)
            n, inv_z1, rmax, inv_z2, dw, alpha = _row_stats(S, DW, b, h, ssb, ssh, ssm, srb,
                                                            srh, offs_m, Lq, log_d, True)
            da_row = tl.load(DA + b * srb + h * srh + offs_m, mask=rows, other=0.0)[None, :]
            vis = visible(offs_m[None, :], offs_n[:, None], Lq, Lk, off, mask_base, smm,
                          smn, CAUSAL, HAS_MASK)
            # (BN, BM) tiles: the transposes of the dQ kernel's
            w, a, da, sig = _weights_grad(alpha * tl.dot(k, qt), vis,
                                          tl.dot(v, tl.trans(do)), n, inv_z1, rmax, inv_z2,
                                          dw, p, REWEIGHT)
            dv += tl.dot(w.to(do.dtype), do)
            ds = tl.where(vis, (da - da_row) * inv_z1 * sig * alpha, 0.0)
            dk += tl.dot(ds.to(qt.dtype), tl.trans(qt))
    keys = offs_n[:, None] < Lk
    store_tile(DK + b * sdkb + hk * sdkh, dk.to(DK.dtype.element_ty), offs_n, keys, offs_d,
               sdkn, sdkd, D)
    store_tile(DV + b * sdvb + hk * sdvh, dv.to(DV.dtype.element_ty), offs_n, keys, offs_e,
               sdvn, sdve, Dv)


def _tiles(bd: int) -> dict[str, tuple[int, int, int, int]]:
    """(BM, BN, num_warps, num_stages) of each kernel for a padded head dim ``bd``."""
    if interpreting():  # small tiles: the tests cross several tiles at small lengths
        one = (16, 16, 1, 1)
        return {"fwd": one, "dq": one, "dkdv": one}
    # untuned first guesses (not yet run on a GPU): q̂ and k̂ are float32, and the
    # accumulators live in registers, so the tiles narrow as the head dim grows
    wide = bd > 64
    warps = 8 if wide else 4
    return {"fwd": (64, 32 if wide else 64, warps, 2),
            "dq": (64 if not wide else 32, 32, warps, 2),
            "dkdv": (32, 64 if not wide else 32, warps, 2)}


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
             log_d: float, reweight_p: float | None) -> tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    G, Lk, Dv = H // k.shape[1], k.shape[2], v.shape[3]
    BD, BE = padded(D), padded(Dv)
    BM, BN, warps, stages = _tiles(max(BD, BE))["fwd"]
    o = torch.empty((B, H, Lq, Dv), dtype=v.dtype, device=q.device)
    stats = torch.empty((B, H, Lq, _STATS), dtype=torch.float32, device=q.device)
    m, ms = mask_strides(mask, (B, H, Lq, Lk))
    _fwd[(triton.cdiv(Lq, BM), B, H)](
        q, k, v, q if m is None else m, o, stats,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *ms, *stats.stride()[:3],
        G, Lq, Lk, D, Dv, float(log_d), float(reweight_p or 1.0),
        CAUSAL=causal, HAS_MASK=m is not None, REWEIGHT=reweight_p is not None,
        BM=BM, BN=BN, BD=BD, BE=BE, num_warps=warps, num_stages=stages)
    return o, stats


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, o: Tensor,
              stats: Tensor, causal: bool, log_d: float, reweight_p: float | None
              ) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    BD, BE = padded(D), padded(Dv)
    tiles = _tiles(max(BD, BE))
    m, ms = mask_strides(mask, (B, H, Lq, Lk))
    mptr = q if m is None else m
    reweight = reweight_p is not None
    p = float(reweight_p or 1.0)
    # Dw_i = sum_j w_ij g_ij = dO_i . O_i
    dw = (do.to(torch.float32) * o.to(torch.float32)).sum(-1).contiguous()
    da = torch.empty_like(dw) if reweight else dw
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(CAUSAL=causal, HAS_MASK=m is not None, REWEIGHT=reweight, BD=BD, BE=BE)
    BM, BN, warps, stages = tiles["dq"]
    _bwd_dq[(triton.cdiv(Lq, BM), B, H)](
        q, k, v, mptr, do, stats, dw, da, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *ms,
        *stats.stride()[:3], dw.stride(0), dw.stride(1),
        G, Lq, Lk, D, Dv, float(log_d), p,
        BM=BM, BN=BN, num_warps=warps, num_stages=stages, **common)
    BM, BN, warps, stages = tiles["dkdv"]
    _bwd_dkdv[(triton.cdiv(Lk, BN), B, Hkv)](
        q, k, v, mptr, do, stats, dw, da, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *ms, *stats.stride()[:3], dw.stride(0), dw.stride(1),
        G, Lq, Lk, D, Dv, float(log_d), p,
        BM=BM, BN=BN, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


@torch.library.custom_op("attnlab::softplus_triton_fwd", mutates_args=())
def softplus_triton_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                        log_d: float, reweight_p: float | None) -> tuple[Tensor, Tensor]:
    """The forward kernel on normalised q̂ (B, H, Lq, D), k̂ (B, H_kv, Lk, D) and v
    (B, H_kv, Lk, Dv): the output (B, H, Lq, Dv) in v's dtype and the float32 row statistics
    (B, H, Lq, 4): N, 1 / z1, rmax, 1 / z2."""
    return _forward(q, k, v, mask, causal, log_d, reweight_p)


@softplus_triton_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, log_d: float,
      reweight_p: float | None) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return (v.new_empty((B, H, Lq, v.shape[-1])),
            q.new_empty((B, H, Lq, _STATS), dtype=torch.float32))


@torch.library.custom_op("attnlab::softplus_triton_bwd", mutates_args=())
def softplus_triton_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                        o: Tensor, stats: Tensor, causal: bool, log_d: float,
                        reweight_p: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernels: the gradients of q̂, k̂ and v from the output's ``do``."""
    return _backward(do, q, k, v, mask, o, stats, causal, log_d, reweight_p)


@softplus_triton_bwd.register_fake
def _(do: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, o: Tensor,
      stats: Tensor, causal: bool, log_d: float, reweight_p: float | None
      ) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, causal, log_d, reweight_p = inputs
    o, stats = output
    ctx.save_for_backward(q, k, v, mask, o, stats)
    ctx.causal, ctx.log_d, ctx.reweight_p = causal, log_d, reweight_p
    ctx.mark_non_differentiable(stats)


def _backward_formula(ctx, do: Tensor, _dstats: Tensor | None):
    q, k, v, mask, o, stats = ctx.saved_tensors
    dq, dk, dv = softplus_triton_bwd(do, q, k, v, mask, o, stats, ctx.causal, ctx.log_d,
                                     ctx.reweight_p)
    return dq, dk, dv, None, None, None, None


softplus_triton_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


def triton_limits(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                  reweight_p: float | None) -> str | None:
    """Why the triton kernels cannot serve this call (None: they can): they take float16,
    bfloat16 or float32 inputs (bfloat16 not under Triton's interpreter, which has no
    bfloat16 arithmetic), head dims 1..128, a bool mask and a power ``reweight_p`` >= 1."""
    why = input_limits(q, v, MAX_HEAD_DIM, k)
    if why is not None:
        return why
    if mask is not None and mask.dtype != torch.bool:
        return f"the triton kernel takes a bool mask, got {mask.dtype}"
    if reweight_p is not None and not reweight_p >= 1:
        return f"the triton kernel takes reweight_p >= 1, got {reweight_p}"
    return None


def softplus_attention_triton(q: Tensor, k: Tensor, v: Tensor, *, causal: bool,
                              mask: Tensor | None, log_d: float,
                              reweight_p: float | None) -> Tensor:
    """LSSA (``reweight_p=None``) or LSSAR attention in Triton, what
    ``softplus_attention(..., backend="reference")`` computes.

    q (B, H, Lq, D); k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv) with H_kv dividing H (GQA kv
    heads are indexed in the kernels, not repeated); ``causal`` aligns queries to the end of
    the keys; ``mask`` bool, broadcastable to (B, H, Lq, Lk), True = may attend; ``log_d`` the
    c of alpha_i = c ln(N_i). q and k are L2-normalised here in float32 (autograd carries the
    gradient through), then the kernels run on them. Returns (B, H, Lq, Dv) in v's dtype,
    differentiable in q, k and v; a row that sees no key is 0.
    """
    why = triton_limits(q, k, v, mask, reweight_p)
    if why is not None:
        raise ValueError(f"softplus_attention_triton: {why}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("softplus_attention_triton: q, k, v must be (B, H, L, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (k.shape[1] == 0 or q.shape[1] % k.shape[1] or k.shape[:3] != v.shape[:3]
            or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]):
        raise ValueError("softplus_attention_triton: expected q (B, H, Lq, D), k (B, H_kv, "
                         "Lk, D), v (B, H_kv, Lk, Dv) with H_kv dividing H, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    qn = F.normalize(q.to(torch.float32), dim=-1)
    kn = F.normalize(k.to(torch.float32), dim=-1)
    out, _ = softplus_triton_fwd(qn, kn, v, mask, bool(causal), float(log_d),
                                 None if reweight_p is None else float(reweight_p))
    return out
