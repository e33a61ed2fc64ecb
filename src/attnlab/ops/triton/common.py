"""What several Triton kernels share.

Host side: head-dim padding, a bool mask read through its strides, and the limit checks of
the inputs (dtype, bfloat16 under the interpreter, head dims). Device side (``@triton.jit``
helpers, inlined into the kernels that call them, their ``tl.constexpr`` arguments staying
compile-time constants): masked (rows, columns) tile loads and stores, the visibility tile of
the score kernels (sigmoid, softplus), and the program prologues and key-tile step that the
flash-style kernels of those two ops have in common.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.ops.triton import interpreting

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the score kernels take


@triton.jit
def visible(qi, kj, Lq, Lk, off, mask_base, smm, smn,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Bool tile: query ``qi`` may see key ``kj`` (index tiles that broadcast together)."""
    vis = (qi < Lq) & (kj < Lk)
    if CAUSAL:
        vis = vis & (kj <= qi + off)
    if HAS_MASK:
        keep = tl.load(mask_base + qi * smm + kj * smn, mask=vis, other=0)
        vis = vis & (keep != 0)
    return vis


@triton.jit
def tile(base, offs_r, ok, offs_c, sr, sc, nc):
    """The (rows, columns) tile at ``base`` (row stride ``sr``, column stride ``sc``): the
    rows ``offs_r`` where ``ok`` (rows, 1) holds and the columns ``offs_c`` < ``nc``, the
    rest 0. Callers pass ``ok`` as they compute it (``offs[:, None] < n``, ``valid[:, None]``)."""
    return tl.load(base + offs_r[:, None] * sr + offs_c[None, :] * sc,
                   mask=ok & (offs_c[None, :] < nc), other=0.0)


@triton.jit
def tile_t(base, offs_r, ok, offs_c, sr, sc, nc):
    """``tile`` transposed, (columns, rows), ``ok`` shaped (1, rows): K^T, V^T or Q^T."""
    return tl.load(base + offs_r[None, :] * sr + offs_c[:, None] * sc,
                   mask=ok & (offs_c[:, None] < nc), other=0.0)


@triton.jit
def store_tile(base, x, offs_r, ok, offs_c, sr, sc, nc):
    """Store the (rows, columns) tile ``x`` where ``ok`` (rows, 1) holds and columns < nc."""
    tl.store(base + offs_r[:, None] * sr + offs_c[None, :] * sc, x,
             mask=ok & (offs_c[None, :] < nc))


@triton.jit
def query_program(Q, K, V, Mask, sqb, sqh, sqm, sqd, skb, skh, svb, svh, smb, smh,
                  G, Lq, Lk, D, BM: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr):
    """The prologue of a program of the grid (query tiles, B, H): its tile ``pid_m``, batch
    ``b`` and head ``h``, the row and head-dim index tiles, the tile's queries q (BM, BD),
    the keys, values (of kv head h // G, G query heads per kv head) and mask of its
    (batch, head), and the causal offset Lk - Lq."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    hk = h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    q = tile(Q + b * sqb + h * sqh, offs_m, offs_m[:, None] < Lq, offs_d, sqm, sqd, D)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = Mask + b * smb + h * smh
    return pid_m, b, h, offs_m, offs_d, offs_e, q, k_base, v_base, mask_base, Lk - Lq


@triton.jit
def key_program(K, V, skb, skh, skn, skd, svb, svh, svn, sve, Lq, Lk, D, Dv,
                CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BD: tl.constexpr, BE: tl.constexpr):
    """The prologue of a dK/dV program of the grid (key tiles, B, H_kv): its key tile
    ``pid_n``, batch ``b`` and kv head ``hk``, the index tiles, the tile's keys k (BN, BD)
    and values v (BN, BE), the causal offset Lk - Lq and ``lo``, the first query row to
    visit (causal: key j is seen by rows i >= j - off, from the tile holding the first)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    k = tile(K + b * skb + hk * skh, offs_n, offs_n[:, None] < Lk, offs_d, skn, skd, D)
    v = tile(V + b * svb + hk * svh, offs_n, offs_n[:, None] < Lk, offs_e, svn, sve, Dv)
    off = Lk - Lq
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(pid_n * BN - off, 0) // BM) * BM
    return pid_n, b, hk, offs_n, offs_d, offs_e, k, v, off, lo


@triton.jit
def key_tile(k_base, start_n, offs_d, skn, skd, Lk, D, BN: tl.constexpr):
    """One step of a query tile's loop over key tiles: the key indices from ``start_n`` and
    K^T (BD, BN), keys < Lk and head dims < D loaded."""
    offs_n = start_n + tl.arange(0, BN)
    return offs_n, tile_t(k_base, offs_n, offs_n[None, :] < Lk, offs_d, skn, skd, D)


def padded(n: int) -> int:
    """A head dim padded to a power of two >= 16 (``tl.dot``'s least block side)."""
    return max(16, triton.next_power_of_2(n))


def mask_strides(mask: Tensor | None, shape: tuple[int, int, int, int]
                 ) -> tuple[Tensor | None, tuple[int, ...]]:
    """The bool mask as uint8 (a view, no copy) broadcast to (B, H, Lq, Lk) by strides."""
    if mask is None:
        return None, (0, 0, 0, 0)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).view(torch.uint8)
    m = m.expand(shape)
    return m, tuple(m.stride())


def input_limits(q: Tensor, v: Tensor, max_head_dim: int, k: Tensor | None = None
                 ) -> str | None:
    """Why a score kernel cannot take these inputs (None: it can): float16, bfloat16 or
    float32 (with ``k``: q, k and v of one dtype), bfloat16 not under Triton's interpreter
    (it has no bfloat16 arithmetic), head dims 1..``max_head_dim``."""
    if k is not None:
        if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            return ("the triton kernel takes float16, bfloat16 or float32 inputs of one "
                    f"dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    elif q.dtype not in DTYPES:
        return f"the triton kernel takes float16, bfloat16 or float32 inputs, got {q.dtype}"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and interpreting():
        return "Triton's interpreter has no bfloat16 arithmetic (bfloat16 runs on CUDA)"
    dims = (q.shape[-1], v.shape[-1])
    if min(dims) < 1 or max(dims) > max_head_dim:
        return (f"the triton kernel takes head dims 1..{max_head_dim}, got q/k {dims[0]} "
                f"and v {dims[1]}")
    return None
