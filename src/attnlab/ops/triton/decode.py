"""Split-KV decoding in Triton (``decode_attention(..., backend="triton")``; inference only).

A few queries (Lq, typically 1-16) attend over a long cache of T keys. With the scores
s_ij = c q_i . k_j (c the scale) and the visibility V_ij (causal: j <= i + T - Lq; the
op's bool mask), the cache is cut into segments S_1 .. S_n of ``seg`` keys (the last one
shorter), and one program per (segment, batch x kv head, block of rows) computes

    m_s = max_{j in S_s, V_ij} s_ij,     l_s = sum_{j in S_s, V_ij} exp(s_ij - m_s),
    u_s = sum_{j in S_s, V_ij} exp(s_ij - m_s) v_j          (the unnormalised partial output)

with an online softmax over key tiles of BLOCK_N keys (fp32 accumulation). A second kernel
merges the segments exactly, one program per output row:

    M = max_s m_s,   O = sum_s exp(m_s - M) u_s / sum_s exp(m_s - M) l_s,

which is softmax attention over all the keys whatever the split; a row that sees no key has
every l_s = 0 and returns 0. The exponentials are taken in base 2 (the scores are scaled by
c log2(e) once, on the queries).

Tiling. GQA: the G = H / H_kv query heads of one kv head and their Lq queries are packed as
the R = G Lq rows of one program (row r is head hk G + r // Lq, query r % Lq), so each
segment of the cache is read once per kv head, never repeated per query head; rows are
padded to BLOCK_M = max(16, next power of two of R) (at most 64; more rows take more row
blocks). Head dims D and Dv are padded to powers of two (>= 16) with masked loads, so
``tl.dot`` sees 16-multiples and any D (8, 12, 48, 80, 96, ...) works. The mask, broadcast
to (B, H, Lq, T) by strides (0 along broadcast axes), is read through computed offsets.

Alongside the partials each program writes, per row, the sum of its raw scores before
masking: a key holding inf or NaN makes it non-finite, which is how the op's probe finds a
non-finite cache without a pass of its own (``decode._split_kv``).

Custom op (issue 42): the two kernels run as one ``torch.library.custom_op`` operator,
``attnlab::decode_triton_fwd`` (output and probe), with a fake kernel, so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node (a dynamic cache
length included: the segment count is computed inside the op, from the real length).
Inference only: no autograd formula is registered, so a backward through it raises (the op
refuses calls that need gradients before they get here). ``custom_op`` rather than
``triton_op``: a ``triton_op`` cannot be traced under Triton's interpreter, where CI tests
the kernels (the reasons in full: ``attnlab.ops.triton.sigmoid``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.ops.triton.common import mask_strides, padded

LOG2E = 1.4426950408889634
MAX_BLOCK_M = 64


@triton.jit
def _segment_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, u_ptr, probe_ptr,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sm_b, sm_h, sm_l, sm_t,
    H_KV, LQ, T, D, DV, R, SEG, N_SEG, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    seg_id = tl.program_id(0)
    bh = tl.program_id(1)
    row_block = tl.program_id(2)
    b = (bh // H_KV).to(tl.int64)  # 64-bit offsets: B x H_kv x T x D may pass 2^31
    hk = bh % H_KV
    groups = R // LQ

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    head = hk * groups + rows // LQ  # the query head of each packed row
    qi = rows % LQ  # its query index
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q_off = b * sq_b + head[:, None] * sq_h + qi[:, None] * sq_l + dd[None, :] * sq_d
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    if not NATIVE_DOT:  # fp32 products (ieee): scores in base-2 units, c log2(e) q . k
        q = q.to(tl.float32) * qk_scale

    start = seg_id * SEG
    end = tl.minimum(start + SEG, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    raw = tl.zeros([BLOCK_M], tl.float32)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        kt = tl.load(k_base + keys[None, :] * sk_t + dd[:, None] * sk_d,
                     mask=key_ok[None, :] & (dd[:, None] < D), other=0.0)  # (BLOCK_D, N)
        vt = tl.load(v_base + keys[:, None] * sv_t + dv[None, :] * sv_d,
                     mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)  # (N, BLOCK_DV)
        if NATIVE_DOT:  # fp16/bf16 cache on a GPU: tensor cores, fp32 accumulation
            s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, N)
        else:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        raw += tl.sum(tl.where(key_ok[None, :], s, 0.0), 1)
        see = key_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            see = see & (keys[None, :] <= qi[:, None] + (T - LQ))
        if HAS_MASK:
            vis = tl.load(mask_ptr + b * sm_b + head[:, None] * sm_h + qi[:, None] * sm_l
                          + keys[None, :] * sm_t, mask=see, other=0)
            see = see & (vis != 0)
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: stay 0
        alpha = tl.math.exp2(m_i - shift)
        p = tl.math.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if NATIVE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        m_i = m_new

    stat = (bh * N_SEG + seg_id) * R + rows
    tl.store(m_ptr + stat, m_i, mask=row_ok)
    tl.store(l_ptr + stat, l_i, mask=row_ok)
    tl.store(probe_ptr + stat, raw, mask=row_ok)
    tl.store(u_ptr + stat[:, None] * DV + dv[None, :], acc,
             mask=row_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, u_ptr, o_ptr,
    so_b, so_h, so_l, so_d,
    H_KV, LQ, DV, R, N_SEG,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)  # one output row: (batch x kv head, packed row)
    bh = pid // R
    r = pid % R
    b = (bh // H_KV).to(tl.int64)
    head = (bh % H_KV) * (R // LQ) + r // LQ
    qi = r % LQ
    segs = tl.arange(0, BLOCK_S)
    seg_ok = segs < N_SEG
    dv = tl.arange(0, BLOCK_DV)
    stat = (bh * N_SEG + segs) * R + r
    m = tl.load(m_ptr + stat, mask=seg_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + stat, mask=seg_ok, other=0.0)
    u = tl.load(u_ptr + stat[:, None] * DV + dv[None, :],
                mask=seg_ok[:, None] & (dv[None, :] < DV), other=0.0)
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(m - top)  # 0 for a segment without a visible key
    total = tl.maximum(tl.sum(w * l_s, 0), 1e-30)  # 0 when the row sees no key: output 0
    out = tl.sum(w[:, None] * u, 0) / total
    tl.store(o_ptr + b * so_b + head * so_h + qi * so_l + dv * so_d,
             out.to(o_ptr.dtype.element_ty), mask=dv < DV)


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(n, 1)))


def default_splits(total: int, programs: int) -> int:
    """Segments for a cache of ``total`` keys when ``splits`` is None: enough programs to
    fill a GPU (~264 = 2 x 132 SMs, counting the ``programs`` per segment that batch, kv
    heads and row blocks give), each segment at least 256 keys, at most 128 segments."""
    by_length = max(1, -(-total // 256))
    by_occupancy = max(1, -(-264 // max(programs, 1)))
    return max(1, min(by_length, by_occupancy, 128))


# The kernels as a PyTorch custom op (see the module docstring); no autograd formula.


@torch.library.custom_op("attnlab::decode_triton_fwd", mutates_args=())
def decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor | None, causal: bool,
              scale: float, splits: int | None) -> tuple[Tensor, Tensor]:
    """The output (B, H, Lq, Dv) in q's dtype and the probe, a float32 scalar."""
    b, h, lq, d = q.shape
    h_kv, total, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    rows = h // h_kv * lq
    block_m = min(_pow2(rows), MAX_BLOCK_M)
    row_blocks = -(-rows // block_m)
    n_split = splits if splits is not None else default_splits(total, b * h_kv * row_blocks)
    seg = -(-total // max(1, min(n_split, total)))
    n_seg = -(-total // seg)
    block_n = min(64, _pow2(seg))
    block_d, block_dv = padded(d), padded(dv)

    mask4, mstrides = mask_strides(mask, (b, h, lq, total))

    dev = q.device
    m = torch.empty(b * h_kv * n_seg * rows, device=dev, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    probe = torch.empty_like(m)
    u = torch.empty(b * h_kv * n_seg * rows, dv, device=dev, dtype=torch.float32)
    out = torch.empty(b, h, lq, dv, device=dev, dtype=q.dtype)
    native = dev.type == "cuda" and k_cache.dtype in (torch.float16, torch.bfloat16)

    _segment_kernel[(n_seg, b * h_kv, row_blocks)](
        q, k_cache, v_cache, q if mask4 is None else mask4, m, l_sum, u, probe,  # q: never read
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mstrides,
        h_kv, lq, total, d, dv, rows, seg, n_seg, scale * LOG2E,
        CAUSAL=causal and lq > 1, HAS_MASK=mask is not None, NATIVE_DOT=native,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
    )
    _merge_kernel[(b * h_kv * rows,)](
        m, l_sum, u, out, *out.stride(), h_kv, lq, dv, rows, n_seg,
        BLOCK_S=_pow2(n_seg, 2), BLOCK_DV=block_dv,
    )
    return out, probe.sum()


@decode_op.register_fake
def _decode_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor | None,
                 causal: bool, scale: float, splits: int | None) -> tuple[Tensor, Tensor]:
    return (q.new_empty((*q.shape[:3], v_cache.shape[-1])),
            q.new_empty((), dtype=torch.float32))


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, causal: bool,
           mask: Tensor | None, scale: float, splits: int | None) -> tuple[Tensor, Tensor]:
    """The decode step (``decode_attention``'s computation) on Triton: q (B, H, Lq, D),
    k_cache / v_cache (B, H_kv, T, D / Dv), mask bool broadcastable to (B, H, Lq, T) or
    None, ``causal`` aligning the queries to the end of the cache, ``splits`` segments (None:
    :func:`default_splits`). Returns the output (B, H, Lq, Dv) in q's dtype and the probe:
    the sum of the scaled scores before masking (non-finite iff a key held inf or NaN, for
    finite queries). One call of the custom op ``attnlab::decode_triton_fwd``."""
    return decode_op(q, k_cache, v_cache, mask, bool(causal), float(scale), splits)
