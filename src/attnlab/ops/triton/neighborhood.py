"""Neighborhood attention in Triton (1-D, 2-D and 3-D): ``backend="triton"`` of
:func:`attnlab.ops.neighborhood_attention`.

Softmax attention restricted to each query's window (the rule of
:mod:`attnlab.ops.neighborhood`: per axis a kernel K, dilation d, stride S, causal or not,
borders shifted or clipped), computed flash-style: forward with an online row max and sum
(the log-sum-exp saved for the backward), backward as a D = rowsum(dO * O) pass and two
kernels, dQ (one program per query tile) and dK/dV (one program per key tile), so that every
gradient is written by exactly one program and no atomics are needed. Scores, softmax and
gradients accumulate in float32; P and dS are rounded to the inputs' dtype before their
products (as the reference rounds the weights to V's dtype).

**Tiles and their ranges.** Every input is seen as 3-D: a 1-D or 2-D one gets leading axes of
length 1 (kernel, dilation and stride 1), so one set of kernels serves 1 to 3 axes. On axis a,
query i lies in the dilation group g = i mod d at the group position i' = i // d, and only
keys of its own group are visible, so tiles are cut inside a group: a query tile is a box of
BM_a consecutive group positions per axis in one group (g_0, g_1, g_2), a key tile a box of
BN_a. In group coordinates query i' sees the keys [start(i'), end(i')) of its group, and both
start and end are non-decreasing in i' for each rule (shift, causal, clip: see
``_window``). Hence:

- the keys seen by a query tile [a, b] on an axis lie in [start(a), end(b)): the kernel
  visits the key tiles start(a) // BN_a ... (end(b) - 1) // BN_a on each axis and their
  product, about (BM_a + K_a) / BN_a + 1 tiles per axis: the cost grows with L * K, never
  with L^2;
- the queries that see key c form an interval too: {i' : end(i') > c} is a suffix and
  {i' : start(i') <= c} a prefix of the group, so the queries that see a key tile [c, e] are
  [first i' with end(i') > c, first i' with start(i') > e), found by two binary searches over
  the (monotone) window rule: exactly the inverse of the forward's range, whatever the rule,
  without a closed form per rule (``_query_tiles``).

All ranges are computed arithmetically in the kernel (no index tables: Triton's interpreter
has no indirect loads); inside a visited tile the per-element mask is the per-axis window
test, the valid positions and the key padding mask, skipped for a key tile that every query
of the tile sees whole on every axis (inside [start(last), end(first)): ``_common``) and that
holds no padding key, which for a wide kernel is most of them. Head dims are padded to a
power of two >= 16 (``tl.dot``'s least side) with masked loads. float32 products use
Triton's default dot precision (tf32 on a GPU unless ``TRITON_F32_DEFAULT=ieee``).

The kernels are PyTorch custom ops (``attnlab::neighborhood_triton_fwd`` and ``_bwd``, with
fake implementations and the backward registered on the forward), so a call traces under
``torch.compile(fullgraph=True)`` and ``torch.export``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.ops.neighborhood import AxisRule
from attnlab.ops.triton import interpreting
from attnlab.ops.triton.common import input_limits, padded, store_tile, tile, tile_t

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
SHIFT, CAUSAL, CLIP = 0, 1, 2  # the window modes of an axis


# ----------------------------------------------------------------------------- window rule
@triton.jit
def _window(ip, Lg, K, S, MODE: tl.constexpr):
    """[start, end): the group positions of the keys seen by group position ``ip`` (a scalar
    or a tensor) on an axis whose group holds ``Lg`` positions; both non-decreasing in ip."""
    if MODE == 2:  # clip: centred, cut at the borders
        start = tl.maximum(ip - K // 2, 0)
        end = tl.minimum(ip - K // 2 + K, Lg)
    else:
        k = tl.minimum(K, Lg)
        if MODE == 1:  # causal
            leader = tl.minimum((ip // S) * S + S - 1, Lg - 1)
            start = tl.maximum(leader - k + 1, 0)
            end = ip + 1
        else:  # shift: k keys around the stride group's leader, shifted inside at borders
            leader = tl.minimum((ip // S) * S + S // 2, Lg - 1)
            start = tl.minimum(tl.maximum(leader - k // 2, 0), Lg - k)
            end = start + k
    return start, end


@triton.jit
def _group(p, L, d, NT):
    """Axis slot ``p`` (of d * NT) -> its dilation group g, tile t and the group length."""
    g = p // NT
    t = p % NT
    return g, t, (L - g + d - 1) // d


@triton.jit
def _key_tiles(t, Lg, K, S, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    """[lo, hi): the key tiles (of BN group positions) that the query tile t (of BM) sees."""
    first = t * BM
    last = tl.minimum(first + BM, Lg) - 1
    lo_key, _ = _window(first, Lg, K, S, MODE)
    _, hi_key = _window(tl.maximum(last, first), Lg, K, S, MODE)
    lo = lo_key // BN
    hi = tl.where(last >= first, (hi_key - 1) // BN + 1, lo)
    return lo, hi


@triton.jit
def _query_tiles(u, Lg, K, S, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                 NITER: tl.constexpr):
    """[lo, hi): the query tiles (of BM) holding every query that sees the key tile u (of
    BN): the inverse of ``_key_tiles``, by binary search over the monotone window rule."""
    c_lo = u * BN
    c_hi = tl.minimum(c_lo + BN, Lg) - 1
    lo = Lg * 0
    hi = Lg
    for _ in range(NITER):  # first query whose window ends after c_lo
        mid = (lo + hi) // 2
        _, e = _window(mid, Lg, K, S, MODE)
        active = lo < hi
        go = e > c_lo
        hi = tl.where(active & go, mid, hi)
        lo = tl.where(active & (e <= c_lo), mid + 1, lo)
    first = lo
    lo = Lg * 0
    hi = Lg
    for _ in range(NITER):  # first query whose window starts after c_hi
        mid = (lo + hi) // 2
        s, _ = _window(mid, Lg, K, S, MODE)
        active = lo < hi
        go = s > c_hi
        hi = tl.where(active & go, mid, hi)
        lo = tl.where(active & (s <= c_hi), mid + 1, lo)
    stop = lo
    q_lo = first // BM
    q_hi = tl.where((stop > first) & (c_hi >= c_lo), (stop - 1) // BM + 1, q_lo)
    return q_lo, q_hi


@triton.jit
def _coords(r, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """Slot r of a (B0, B1, B2) box, row-major -> its offsets per axis."""
    return r // (B1 * B2), (r // B2) % B1, r % B2


@triton.jit
def _positions(t0, t1, t2, g0, g1, g2, Lg0, Lg1, Lg2, d0, d1, d2, L1, L2,
               B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """Group positions per axis, flat sequence index and validity of the slots of tile
    (t0, t1, t2) of the dilation group (g0, g1, g2)."""
    r0, r1, r2 = _coords(tl.arange(0, B0 * B1 * B2), B0, B1, B2)
    p0 = t0 * B0 + r0
    p1 = t1 * B1 + r1
    p2 = t2 * B2 + r2
    valid = (p0 < Lg0) & (p1 < Lg1) & (p2 < Lg2)
    flat = ((g0 + d0 * p0) * L1 + g1 + d1 * p1) * L2 + g2 + d2 * p2
    return p0, p1, p2, flat, valid


@triton.jit
def _seen(s0, e0, s1, e1, s2, e2, qvalid, j0, j1, j2, kvalid):
    """(rows, keys) bool: query row (windows [s_a, e_a) per axis) sees key (j0, j1, j2)."""
    vis = qvalid[:, None] & kvalid[None, :]
    vis = vis & (s0[:, None] <= j0[None, :]) & (j0[None, :] < e0[:, None])
    vis = vis & (s1[:, None] <= j1[None, :]) & (j1[None, :] < e1[:, None])
    vis = vis & (s2[:, None] <= j2[None, :]) & (j2[None, :] < e2[:, None])
    return vis


@triton.jit
def _common(t, Lg, K, S, BM: tl.constexpr, MODE: tl.constexpr):
    """[start(last), end(first)): the keys that every query of tile t sees on this axis
    (windows are monotone); empty when the tile runs past the group's end."""
    first = t * BM
    last = first + BM - 1
    _, e_first = _window(first, Lg, K, S, MODE)
    s_last, _ = _window(tl.minimum(last, Lg - 1), Lg, K, S, MODE)
    whole = last < Lg
    return tl.where(whole, s_last, Lg), tl.where(whole, e_first, 0)


@triton.jit
def _within(u, lo, hi, BN: tl.constexpr):
    """Key tile u (of BN) lies inside the group positions [lo, hi)."""
    return (u * BN >= lo) & (u * BN + BN <= hi)


@triton.jit
def _masked(x, other, full, TRANS: tl.constexpr, s0, e0, s1, e1, s2, e2, qvalid,
            j0, j1, j2, kvalid):
    """x where the query sees the key, else ``other``; a ``full`` tile (every query sees
    every key) skips the per-element test. TRANS: x is (keys, queries)."""
    if full:
        y = x
    else:
        vis = _seen(s0, e0, s1, e1, s2, e2, qvalid, j0, j1, j2, kvalid)
        if TRANS:
            vis = tl.trans(vis)
        y = tl.where(vis, x, other)
    return y


@triton.jit
def _all(valid):
    """Every slot of a 1-D bool tile is set (a scalar)."""
    return tl.min(valid.to(tl.int32), axis=0) == 1


@triton.jit
def _groups(pid, L0, L1, L2, d0, d1, d2, N0, N1, N2):
    """Program ``pid`` -> its dilation group g, tile t and group length Lg on each axis
    (axis 2 varies fastest)."""
    g2, t2, Lg2 = _group(pid % (d2 * N2), L2, d2, N2)
    g1, t1, Lg1 = _group((pid // (d2 * N2)) % (d1 * N1), L1, d1, N1)
    g0, t0, Lg0 = _group(pid // (d2 * N2 * d1 * N1), L0, d0, N0)
    return g0, t0, Lg0, g1, t1, Lg1, g2, t2, Lg2


@triton.jit
def _query_axis(p, t, Lg, K, S, BM: tl.constexpr, MODE: tl.constexpr):
    """On one axis, for the group positions ``p`` of query tile t: each query's window
    [s, e) and the keys [cs, ce) that every query of the tile sees (``_common``)."""
    s, e = _window(p, Lg, K, S, MODE)
    cs, ce = _common(t, Lg, K, S, BM, MODE)
    return s, e, cs, ce


@triton.jit
def _full(u0, u1, u2, cs0, ce0, cs1, ce1, cs2, ce2,
          BN0: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr):
    """Key tile (u0, u1, u2) lies inside the keys every query of the tile sees, per axis."""
    return (_within(u0, cs0, ce0, BN0) & _within(u1, cs1, ce1, BN1)
            & _within(u2, cs2, ce2, BN2))


@triton.jit
def _key_slots(u0, u1, u2, g0, g1, g2, Lg0, Lg1, Lg2, d0, d1, d2, L1, L2, m_base, smn,
               HAS_MASK: tl.constexpr, BN0: tl.constexpr, BN1: tl.constexpr,
               BN2: tl.constexpr):
    """``_positions`` of key tile (u0, u1, u2), its validity cleared where the key padding
    mask (at ``m_base``, stride ``smn``) holds False."""
    j0, j1, j2, kflat, kvalid = _positions(u0, u1, u2, g0, g1, g2, Lg0, Lg1, Lg2,
                                           d0, d1, d2, L1, L2, BN0, BN1, BN2)
    if HAS_MASK:
        keep = tl.load(m_base + kflat * smn, mask=kvalid, other=0)
        kvalid = kvalid & (keep != 0)
    return j0, j1, j2, kflat, kvalid


# ---------------------------------------------------------------------------------- forward
@triton.jit
def _nbh_fwd(Q, K, V, M, O, LSE,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
             sob, soh, som, soe, smb, smn, slb, slh,
             H, G, D, Dv, qk_scale,
             L0, L1, L2, K0, K1, K2, d0, d1, d2, S0, S1, S2, N0, N1, N2,
             MODE0: tl.constexpr, MODE1: tl.constexpr, MODE2: tl.constexpr,
             HAS_MASK: tl.constexpr,
             BM0: tl.constexpr, BM1: tl.constexpr, BM2: tl.constexpr,
             BN0: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr,
             BD: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    g0, t0, Lg0, g1, t1, Lg1, g2, t2, Lg2 = _groups(pid, L0, L1, L2, d0, d1, d2, N0, N1, N2)
    p0, p1, p2, flat, qvalid = _positions(t0, t1, t2, g0, g1, g2, Lg0, Lg1, Lg2,
                                          d0, d1, d2, L1, L2, BM0, BM1, BM2)
    s0, e0, cs0, ce0 = _query_axis(p0, t0, Lg0, K0, S0, BM0, MODE0)
    s1, e1, cs1, ce1 = _query_axis(p1, t1, Lg1, K1, S1, BM1, MODE1)
    s2, e2, cs2, ce2 = _query_axis(p2, t2, Lg2, K2, S2, BM2, MODE2)
    lo0, hi0 = _key_tiles(t0, Lg0, K0, S0, BM0, BN0, MODE0)
    lo1, hi1 = _key_tiles(t1, Lg1, K1, S1, BM1, BN1, MODE1)
    lo2, hi2 = _key_tiles(t2, Lg2, K2, S2, BM2, BN2, MODE2)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    q = tile(Q + b * sqb + h * sqh, flat, qvalid[:, None], offs_d, sqm, sqd, D)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full((BM0 * BM1 * BM2,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM0 * BM1 * BM2,), dtype=tl.float32)
    acc = tl.zeros((BM0 * BM1 * BM2, BE), dtype=tl.float32)
    for u0 in range(lo0, hi0):
        for u1 in range(lo1, hi1):
            for u2 in range(lo2, hi2):
                j0, j1, j2, kflat, kvalid = _key_slots(u0, u1, u2, g0, g1, g2, Lg0, Lg1, Lg2,
                                                       d0, d1, d2, L1, L2, M + b * smb, smn,
                                                       HAS_MASK, BN0, BN1, BN2)
                full = _full(u0, u1, u2, cs0, ce0, cs1, ce1, cs2, ce2, BN0, BN1, BN2)
                if HAS_MASK:
                    full = full & _all(kvalid)
                kt = tile_t(k_base, kflat, kvalid[None, :], offs_d, skn, skd, D)
                s = _masked(tl.dot(q, kt) * qk_scale, float("-inf"), full, False,
                            s0, e0, s1, e1, s2, e2, qvalid, j0, j1, j2, kvalid)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tile(v_base, kflat, kvalid[:, None], offs_e, svn, sve, Dv)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    store_tile(O + b * sob + h * soh, out.to(O.dtype.element_ty), flat, qvalid[:, None],
               offs_e, som, soe, Dv)
    # log2-sum-exp2 of the scaled scores; 0 for a row that sees no key (its P is masked)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), 0.0)
    tl.store(LSE + b * slb + h * slh + flat, lse, mask=qvalid)


# --------------------------------------------------------------------------------- backward
@triton.jit
def _nbh_bwd_dq(Q, K, V, M, DO, LSE, DELTA, DQ,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
                sdob, sdoh, sdom, sdoe, sdqb, sdqh, sdqm, sdqd, smb, smn, slb, slh,
                H, G, D, Dv, scale, qk_scale,
                L0, L1, L2, K0, K1, K2, d0, d1, d2, S0, S1, S2, N0, N1, N2,
                MODE0: tl.constexpr, MODE1: tl.constexpr, MODE2: tl.constexpr,
                HAS_MASK: tl.constexpr,
                BM0: tl.constexpr, BM1: tl.constexpr, BM2: tl.constexpr,
                BN0: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr,
                BD: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // G
    g0, t0, Lg0, g1, t1, Lg1, g2, t2, Lg2 = _groups(pid, L0, L1, L2, d0, d1, d2, N0, N1, N2)
    p0, p1, p2, flat, qvalid = _positions(t0, t1, t2, g0, g1, g2, Lg0, Lg1, Lg2,
                                          d0, d1, d2, L1, L2, BM0, BM1, BM2)
    s0, e0, cs0, ce0 = _query_axis(p0, t0, Lg0, K0, S0, BM0, MODE0)
    s1, e1, cs1, ce1 = _query_axis(p1, t1, Lg1, K1, S1, BM1, MODE1)
    s2, e2, cs2, ce2 = _query_axis(p2, t2, Lg2, K2, S2, BM2, MODE2)
    lo0, hi0 = _key_tiles(t0, Lg0, K0, S0, BM0, BN0, MODE0)
    lo1, hi1 = _key_tiles(t1, Lg1, K1, S1, BM1, BN1, MODE1)
    lo2, hi2 = _key_tiles(t2, Lg2, K2, S2, BM2, BN2, MODE2)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    q = tile(Q + b * sqb + h * sqh, flat, qvalid[:, None], offs_d, sqm, sqd, D)
    do = tile(DO + b * sdob + h * sdoh, flat, qvalid[:, None], offs_e, sdom, sdoe, Dv)
    lse = tl.load(LSE + b * slb + h * slh + flat, mask=qvalid, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + flat, mask=qvalid, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros((BM0 * BM1 * BM2, BD), dtype=tl.float32)
    for u0 in range(lo0, hi0):
        for u1 in range(lo1, hi1):
            for u2 in range(lo2, hi2):
                j0, j1, j2, kflat, kvalid = _key_slots(u0, u1, u2, g0, g1, g2, Lg0, Lg1, Lg2,
                                                       d0, d1, d2, L1, L2, M + b * smb, smn,
                                                       HAS_MASK, BN0, BN1, BN2)
                full = _full(u0, u1, u2, cs0, ce0, cs1, ce1, cs2, ce2, BN0, BN1, BN2)
                if HAS_MASK:
                    full = full & _all(kvalid)
                kt = tile_t(k_base, kflat, kvalid[None, :], offs_d, skn, skd, D)
                vt = tile_t(v_base, kflat, kvalid[None, :], offs_e, svn, sve, Dv)
                p = _masked(tl.exp2(tl.dot(q, kt) * qk_scale - lse[:, None]), 0.0, full, False,
                            s0, e0, s1, e1, s2, e2, qvalid, j0, j1, j2, kvalid)
                ds = p * (tl.dot(do, vt) - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    store_tile(DQ + b * sdqb + h * sdqh, (dq * scale).to(DQ.dtype.element_ty), flat,
               qvalid[:, None], offs_d, sdqm, sdqd, D)


@triton.jit
def _nbh_bwd_dkdv(Q, K, V, M, DO, LSE, DELTA, DK, DV,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sve,
                  sdob, sdoh, sdom, sdoe, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdve,
                  smb, smn, slb, slh,
                  Hkv, G, D, Dv, scale, qk_scale,
                  L0, L1, L2, K0, K1, K2, d0, d1, d2, S0, S1, S2, N0, N1, N2,
                  MODE0: tl.constexpr, MODE1: tl.constexpr, MODE2: tl.constexpr,
                  HAS_MASK: tl.constexpr, NITER0: tl.constexpr, NITER1: tl.constexpr,
                  NITER2: tl.constexpr,
                  BM0: tl.constexpr, BM1: tl.constexpr, BM2: tl.constexpr,
                  BN0: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr,
                  BD: tl.constexpr, BE: tl.constexpr):
    # N0..N2: key tiles per group and axis; the program owns one key tile of one kv head
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    g0, u0, Lg0, g1, u1, Lg1, g2, u2, Lg2 = _groups(pid, L0, L1, L2, d0, d1, d2, N0, N1, N2)
    j0, j1, j2, kflat, kvalid = _key_slots(u0, u1, u2, g0, g1, g2, Lg0, Lg1, Lg2, d0, d1, d2,
                                           L1, L2, M + b * smb, smn, HAS_MASK, BN0, BN1, BN2)
    keys_all = _all(kvalid)  # no padding key in this tile (out-of-group slots count too)
    lo0, hi0 = _query_tiles(u0, Lg0, K0, S0, BM0, BN0, MODE0, NITER0)
    lo1, hi1 = _query_tiles(u1, Lg1, K1, S1, BM1, BN1, MODE1, NITER1)
    lo2, hi2 = _query_tiles(u2, Lg2, K2, S2, BM2, BN2, MODE2, NITER2)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    k = tile(K + b * skb + hk * skh, kflat, kvalid[:, None], offs_d, skn, skd, D)
    v = tile(V + b * svb + hk * svh, kflat, kvalid[:, None], offs_e, svn, sve, Dv)
    dk = tl.zeros((BN0 * BN1 * BN2, BD), dtype=tl.float32)
    dv = tl.zeros((BN0 * BN1 * BN2, BE), dtype=tl.float32)
    for gh in range(0, G):
        h = hk * G + gh
        for t0 in range(lo0, hi0):
            for t1 in range(lo1, hi1):
                for t2 in range(lo2, hi2):
                    p0, p1, p2, flat, qvalid = _positions(t0, t1, t2, g0, g1, g2, Lg0, Lg1,
                                                          Lg2, d0, d1, d2, L1, L2,
                                                          BM0, BM1, BM2)
                    s0, e0, cs0, ce0 = _query_axis(p0, t0, Lg0, K0, S0, BM0, MODE0)
                    s1, e1, cs1, ce1 = _query_axis(p1, t1, Lg1, K1, S1, BM1, MODE1)
                    s2, e2, cs2, ce2 = _query_axis(p2, t2, Lg2, K2, S2, BM2, MODE2)
                    qt = tile_t(Q + b * sqb + h * sqh, flat, qvalid[None, :], offs_d, sqm, sqd, D)
                    do = tile(DO + b * sdob + h * sdoh, flat, qvalid[:, None], offs_e, sdom,
                              sdoe, Dv)
                    lse = tl.load(LSE + b * slb + h * slh + flat, mask=qvalid, other=0.0)
                    delta = tl.load(DELTA + b * slb + h * slh + flat, mask=qvalid, other=0.0)
                    full = keys_all & _full(u0, u1, u2, cs0, ce0, cs1, ce1, cs2, ce2,
                                            BN0, BN1, BN2)
                    # transposed tiles (keys, queries): P^T and dS^T
                    pt = _masked(tl.exp2(tl.dot(k, qt) * qk_scale - lse[None, :]), 0.0, full,
                                 True, s0, e0, s1, e1, s2, e2, qvalid, j0, j1, j2, kvalid)
                    dv += tl.dot(pt.to(do.dtype), do)
                    dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
                    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    store_tile(DK + b * sdkb + hk * sdkh, (dk * scale).to(DK.dtype.element_ty), kflat,
               _inside(j0, j1, j2, Lg0, Lg1, Lg2)[:, None], offs_d, sdkn, sdkd, D)
    store_tile(DV + b * sdvb + hk * sdvh, dv.to(DV.dtype.element_ty), kflat,
               _inside(j0, j1, j2, Lg0, Lg1, Lg2)[:, None], offs_e, sdvn, sdve, Dv)


@triton.jit
def _inside(j0, j1, j2, Lg0, Lg1, Lg2):
    """The slots of a tile that are positions of the group (padding keys included)."""
    return (j0 < Lg0) & (j1 < Lg1) & (j2 < Lg2)


@triton.jit
def _probe(KEYS, QUERIES, L, K, d, S, NQ, NK, MODE: tl.constexpr, NITER: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr):
    """The ranges the kernels use on one axis: KEYS (d, NQ, 2) of each query tile and
    QUERIES (d, NK, 2) of each key tile (for tests: the same jit functions as the kernels)."""
    g = tl.program_id(0)
    t = tl.program_id(1)
    Lg = (L - g + d - 1) // d
    lo, hi = _key_tiles(t, Lg, K, S, BM, BN, MODE)
    tl.store(KEYS + (g * NQ + t) * 2, lo, mask=t < NQ)
    tl.store(KEYS + (g * NQ + t) * 2 + 1, hi, mask=t < NQ)
    lo, hi = _query_tiles(t, Lg, K, S, BM, BN, MODE, NITER)
    tl.store(QUERIES + (g * NK + t) * 2, lo, mask=t < NK)
    tl.store(QUERIES + (g * NK + t) * 2 + 1, hi, mask=t < NK)


# ------------------------------------------------------------------------------------- host


def _mode(rule: AxisRule) -> int:
    return CLIP if rule.clip else CAUSAL if rule.causal else SHIFT


def _flat_rules(rules: Sequence[AxisRule]) -> tuple[list[int], list[int], list[int],
                                                     list[int], list[int]]:
    """(lengths, kernels, dilations, strides, modes) of the rules, one int per axis."""
    return ([r.length for r in rules], [r.kernel for r in rules], [r.dilation for r in rules],
            [r.stride for r in rules], [_mode(r) for r in rules])


def _as_3d(values: Sequence[int], fill: int) -> list[int]:
    """Per-axis values of 1 to 3 axes behind leading axes of ``fill`` (3 in all)."""
    return [fill] * (3 - len(values)) + list(values)


def default_block(n_axes: int, bd: int) -> tuple[int, ...]:
    """Tile edge per axis (queries and keys alike; a power of two, product >= 16)."""
    if interpreting():  # small tiles: the tests cross several tiles at small lengths
        return ((16,), (4, 4), (1, 4, 4))[n_axes - 1]
    # untuned first guesses (not yet run on a GPU): 64 positions per tile, 32 for wide heads
    if n_axes == 1:
        return (64,) if bd <= 64 else (32,)
    if n_axes == 2:
        return (8, 8) if bd <= 64 else (4, 8)
    return (4, 4, 4) if bd <= 64 else (2, 4, 4)


def _check_block(block: Sequence[int], n_axes: int) -> str | None:
    if len(block) != n_axes or any(
            not isinstance(x, int) or x < 1 or x & (x - 1) for x in block):
        return f"block must be {n_axes} powers of two (one per axis), got {tuple(block)}"
    if math.prod(block) < 16 or math.prod(block) > 256:
        return f"block's product must be 16 to 256 (tl.dot's sides), got {tuple(block)}"
    return None


def _geometry(spatial: list[int], kernel: list[int], dilation: list[int], stride: list[int],
              mode: list[int], block: list[int]) -> dict:
    """The kernels' axis arguments (3 axes) for tiles of ``block`` positions per axis."""
    L, Kk, d, S = (_as_3d(x, 1) for x in (spatial, kernel, dilation, stride))
    modes = _as_3d(mode, SHIFT)
    bl = _as_3d(block, 1)
    n = [triton.cdiv(triton.cdiv(L[a], d[a]), bl[a]) for a in range(3)]
    return {"L": L, "K": Kk, "d": d, "S": S, "N": n, "modes": modes, "block": bl,
            "programs": math.prod(d[a] * n[a] for a in range(3)),
            # binary search steps per axis: enough for the longest group (ceil(L / d))
            "niter": [triton.cdiv(x, y).bit_length() + 1 for x, y in zip(L, d, strict=True)]}


def _axis_args(geo: dict) -> list[int]:
    return [*geo["L"], *geo["K"], *geo["d"], *geo["S"], *geo["N"]]


def _mask_args(key_mask: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
    if key_mask is None:
        return q, (0, 0)
    m = key_mask.reshape(key_mask.shape[0], -1).view(torch.uint8)
    return m, (m.stride(0), m.stride(1))


def _forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, spatial: list[int],
             kernel: list[int], dilation: list[int], stride: list[int], mode: list[int],
             block: list[int], scale: float) -> tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    G = H // k.shape[1]
    geo = _geometry(spatial, kernel, dilation, stride, mode, block)
    o = torch.empty((B, H, L, Dv), dtype=v.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    m, ms = _mask_args(key_mask, q)
    bm = geo["block"]
    _nbh_fwd[(geo["programs"], B * H)](
        q, k, v, m, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *ms,
        lse.stride(0), lse.stride(1), H, G, D, Dv, scale * LOG2E, *_axis_args(geo),
        MODE0=geo["modes"][0], MODE1=geo["modes"][1], MODE2=geo["modes"][2],
        HAS_MASK=key_mask is not None, BM0=bm[0], BM1=bm[1], BM2=bm[2],
        BN0=bm[0], BN1=bm[1], BN2=bm[2], BD=padded(D), BE=padded(Dv), num_warps=4,
        num_stages=2)
    return o, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
              key_mask: Tensor | None, spatial: list[int], kernel: list[int],
              dilation: list[int], stride: list[int], mode: list[int], block: list[int],
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, H, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    geo = _geometry(spatial, kernel, dilation, stride, mode, block)
    # the D pass: rowsum(dO * O) in float32, (B, H, L) with lse's strides
    delta = (do.float() * o.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    m, ms = _mask_args(key_mask, q)
    bm = geo["block"]
    consts = {"MODE0": geo["modes"][0], "MODE1": geo["modes"][1], "MODE2": geo["modes"][2],
              "HAS_MASK": key_mask is not None, "BM0": bm[0], "BM1": bm[1], "BM2": bm[2],
              "BN0": bm[0], "BN1": bm[1], "BN2": bm[2], "BD": padded(D), "BE": padded(Dv),
              "num_warps": 4, "num_stages": 2}
    _nbh_bwd_dq[(geo["programs"], B * H)](
        q, k, v, m, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dq.stride(), *ms, lse.stride(0), lse.stride(1), H, G, D, Dv, scale, scale * LOG2E,
        *_axis_args(geo), **consts)
    _nbh_bwd_dkdv[(geo["programs"], B * Hkv)](
        q, k, v, m, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dk.stride(), *dv.stride(), *ms, lse.stride(0), lse.stride(1),
        Hkv, G, D, Dv, scale, scale * LOG2E, *_axis_args(geo), NITER0=geo["niter"][0],
        NITER1=geo["niter"][1], NITER2=geo["niter"][2], **consts)
    return dq, dk, dv


# ------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("attnlab::neighborhood_triton_fwd", mutates_args=())
def neighborhood_triton_fwd(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
                            spatial: list[int], kernel: list[int], dilation: list[int],
                            stride: list[int], mode: list[int], block: list[int],
                            scale: float) -> tuple[Tensor, Tensor]:
    """Forward kernel: (out (B, H, L, Dv) in v's dtype, log2-sum-exp2 (B, H, L) float32)."""
    return _forward(q, k, v, key_mask, spatial, kernel, dilation, stride, mode, block, scale)


@neighborhood_triton_fwd.register_fake
def _fwd_fake(q, k, v, key_mask, spatial, kernel, dilation, stride, mode, block, scale):
    B, H, L = q.shape[:3]
    return (q.new_empty((B, H, L, v.shape[-1]), dtype=v.dtype),
            q.new_empty((B, H, L), dtype=torch.float32))


@torch.library.custom_op("attnlab::neighborhood_triton_bwd", mutates_args=())
def neighborhood_triton_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                            lse: Tensor, key_mask: Tensor | None, spatial: list[int],
                            kernel: list[int], dilation: list[int], stride: list[int],
                            mode: list[int], block: list[int], scale: float
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernels: (dq, dk, dv) of the forward for the output's gradient ``do``."""
    return _backward(do, q, k, v, o, lse, key_mask, spatial, kernel, dilation, stride, mode,
                     block, scale)


@neighborhood_triton_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, key_mask, spatial, kernel, dilation, stride, mode, block,
              scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_mask, spatial, kernel, dilation, stride, mode, block, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_mask)
    ctx.rule = (spatial, kernel, dilation, stride, mode, block, scale)


def _autograd_backward(ctx, do, dlse):
    q, k, v, o, lse, key_mask = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = neighborhood_triton_bwd(do, q, k, v, o, lse, key_mask, *ctx.rule)
    return dq, dk, dv, None, None, None, None, None, None, None, None


neighborhood_triton_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ public API
def triton_limits(q: Tensor, v: Tensor, rules: Sequence[AxisRule], key_mask: Tensor | None,
                  block: int | Sequence[int] | None = None) -> str | None:
    """Why the triton kernel cannot serve this call (None: it can): float16, bfloat16 or
    float32 inputs (bfloat16 not under Triton's interpreter, which has no bfloat16
    arithmetic), head dims 1..128, 1 to 3 spatial axes, and ``block`` (tile edge per axis) a
    power of two per axis with a product from 16 to 256; any rule and key padding mask."""
    why = input_limits(q, v, MAX_HEAD_DIM)
    if why is not None:
        return why
    if not 1 <= len(rules) <= 3:
        return f"the triton kernel takes 1 to 3 spatial axes, got {len(rules)}"
    if key_mask is not None and key_mask.dtype != torch.bool:
        return f"the triton kernel takes a bool key mask, got {key_mask.dtype}"
    if block is not None:
        bl = (block,) * len(rules) if isinstance(block, int) else tuple(block)
        why = _check_block(bl, len(rules))
        if why is not None:
            return f"the triton kernel's {why}"
    return None


def neighborhood_attention_triton(q: Tensor, k: Tensor, v: Tensor, rules: Sequence[AxisRule],
                                  key_mask: Tensor | None, scale: float,
                                  block: int | Sequence[int] | None = None) -> Tensor:
    """Softmax neighborhood attention of the window ``rules`` (one :class:`AxisRule` per
    spatial axis, 1 to 3) in Triton, forward and backward.

    q (B, H, *spatial, D) or (B, H, L, D) with L = prod(spatial) (row-major), k (B, H_kv, ..,
    D) and v (B, H_kv, .., Dv) alike with H_kv dividing H (GQA kv heads are indexed in the
    kernels, never repeated); ``key_mask`` None or bool (B, *spatial) / (B, L), True = a real
    key; ``block`` the tile edge per axis (a power of two each, product 16 to 256), else
    per-axis defaults. A row that sees no key gives 0. Returns q's shape with v's head dim,
    in v's dtype; differentiable in q, k and v. The op checks its arguments (see
    :func:`triton_limits`) before calling.
    """
    rules = list(rules)
    n = len(rules)
    spatial, kernel, dilation, stride, mode = _flat_rules(rules)
    B, H = q.shape[:2]
    L = math.prod(spatial)
    if q.shape[2:-1] not in (tuple(spatial), (L,)):
        raise ValueError(f"neighborhood_attention_triton: q {tuple(q.shape)} does not match "
                         f"the rules' spatial shape {tuple(spatial)}")
    if block is None:
        bl = default_block(n, max(padded(q.shape[-1]), padded(v.shape[-1])))
    else:
        bl = (block,) * n if isinstance(block, int) else tuple(block)
        why = _check_block(bl, n)
        if why is not None:
            raise ValueError(f"neighborhood_attention_triton: {why}")
    flat = [t.reshape(t.shape[0], t.shape[1], L, t.shape[-1]) for t in (q, k, v)]
    out, _ = neighborhood_triton_fwd(*flat, key_mask, spatial, kernel, dilation, stride, mode,
                                     list(bl), float(scale))
    return out.reshape(*q.shape[:-1], v.shape[-1])


def tile_ranges(rule: AxisRule, block_q: int, block_k: int,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The tile ranges the kernels compute on one axis, for tests: ``keys`` (d, NQ, 2), the
    [first, last + 1) key tiles visited by each query tile of each dilation group, and
    ``queries`` (d, NK, 2), the query tiles visited by each key tile (dK/dV); tiles of
    ``block_q`` and ``block_k`` group positions, NQ and NK of them per group (the last ones
    of a shorter group are empty); the probe kernel runs on ``device``."""
    d = rule.dilation
    glen = triton.cdiv(rule.length, d)
    nq, nk = triton.cdiv(glen, block_q), triton.cdiv(glen, block_k)
    keys = torch.zeros((d, nq, 2), dtype=torch.int32, device=device)
    queries = torch.zeros((d, nk, 2), dtype=torch.int32, device=device)
    _probe[(d, max(nq, nk))](keys, queries, rule.length, rule.kernel, d, rule.stride, nq, nk,
                             MODE=_mode(rule), NITER=glen.bit_length() + 1, BM=block_q,
                             BN=block_k)
    return keys.cpu(), queries.cpu()
