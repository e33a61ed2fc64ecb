"""Split-KV decoding with an exact merge (Lean attention's decomposition).

"Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of
Transformers": split the cached keys into segments of (near) equal work, compute per segment
the row max m_s, the sum of exponentials l_s = sum_j exp(c q.k_j - m_s) and the partial
output o_s = sum_j exp(c q.k_j - m_s) v_j / l_s, then merge exactly:

    M = max_s m_s,   L = sum_s l_s exp(m_s - M),   O = sum_s l_s exp(m_s - M) o_s / L
      = sum_s exp(m_s - M) u_s / L   with u_s = l_s o_s, the unnormalised partial output.

The result is the softmax attention over all keys, whatever the split.
"""

from __future__ import annotations

import functools
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.masks import visibility
from attnlab.ops.common import default_scale, guarded_op, shifted_exp, unit_last_stride, upcast
from attnlab.ops.dispatch import choose, needs_grad
from attnlab.ops.softmax import softmax_attention

# "triton": split-KV kernels (ops/triton/decode.py; inference only); "split": attnlab's
# segments and exact merge; "fused": one call of SDPA's fused kernels;
# "reference": softmax_attention's dense reference. "auto": triton on CUDA where the kernels
# can serve the call (see ops.triton.why_not), else fused on an accelerator when ``splits``
# is None (``fused_kernel_device``), else split.
BACKENDS = ("triton", "split", "fused", "reference")


@functools.cache
def _sdpa_takes_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5)."""
    try:
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1),
                                       torch.zeros(1, 1, 1, 1), enable_gqa=True)
    except TypeError:
        return False
    return True


def fused_kernel_device(device: torch.device) -> bool:
    """Whether ``decode_attention`` with ``splits=None`` hands the step to SDPA's fused
    kernels (with ``enable_gqa``: no copy of the cache) instead of its own segments: on an
    accelerator, where SDPA has split-KV kernels of its own and a step of a few small launches
    is launch-bound. Not on a CPU, where SDPA's GQA path was measured 0.27-0.83x of a plain
    matmul over the cache (benchmarks/results/bench-decode-cpu-vm.md); nor with a torch whose
    SDPA cannot take fewer kv heads than query heads without copying the cache."""
    return device.type != "cpu" and _sdpa_takes_gqa()


def _fused(q: Tensor, k_cache: Tensor, v_cache: Tensor, vis: Tensor | None,
           scale: float | None, probe: bool) -> tuple[Tensor, Tensor | None]:
    """The step as one SDPA call in the cache's dtype, and (``probe``) the sum of the cache:
    SDPA gives no scores to look at, so the cache's own sums stand for them (a key k = -inf
    scored -inf would otherwise pass unseen)."""
    q, k_cache, v_cache = unit_last_stride(q, k_cache, v_cache)  # else SDPA's math path
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=vis, scale=scale,
                                         enable_gqa=k_cache.shape[1] != q.shape[1])
    if vis is not None:  # a row that sees no key gives 0 (SDPA's kernels differ there)
        out = out.masked_fill(~vis.any(-1, keepdim=True), 0.0)
    return out, (k_cache.sum() + v_cache.sum()) if probe else None


def _own_segments(q: Tensor, k_cache: Tensor, v_cache: Tensor, vis: Tensor | None,
                  splits: int, scale: float | None, probe: bool) -> tuple[Tensor, Tensor | None]:
    """The step in ``splits`` segments of the cache (float32 at least), and (``probe``) sums
    of its scores before masking: one number, or one per row (either adds to the output)."""
    b, h, lq, d = q.shape
    h_kv, total = k_cache.shape[1], k_cache.shape[2]
    rows = h // h_kv * lq
    # GQA without copying the cache: the query heads of one kv head become extra rows
    q32, k32, v32 = upcast(q.reshape(b, h_kv, rows, d), k_cache, v_cache)
    q32 = q32 * default_scale(q, scale)
    if vis is not None:
        vis = vis.reshape((1,) * (4 - vis.dim()) + tuple(vis.shape))  # (B or 1, H or 1, Lq, T)
        vis = vis.expand(vis.shape[0], h, lq, total).reshape(vis.shape[0], h_kv, rows, total)
    if splits == 1 and vis is None:  # one segment, every key visible: a plain softmax
        s = q32 @ k32.transpose(-1, -2)
        # the probe as row sums (a reduction along rows: ~2x cheaper than one over all scores)
        return torch.softmax(s, -1) @ v32, s.sum(-1, keepdim=True) if probe else None
    return _merged_segments(q32, k32, v32, vis, splits, probe)


def _auto_takes_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether ``backend="auto"`` runs the triton kernels: on CUDA, triton importable (and
    ``ATTNLAB_TRITON_AUTO`` not 0), and the call within the kernels' limits."""
    from attnlab.ops import triton as kernels  # the package; triton itself not imported

    return (kernels.why_not(q.device.type, auto=True) is None
            and triton_limits(q, k_cache, v_cache) is None)


def _backend(backend: str, splits: int | None, q: Tensor, k_cache: Tensor,
             v_cache: Tensor) -> str:
    """The backend ``decode_attention`` runs: ``backend`` checked against ``splits``, or the
    choice of ``"auto"``."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"decode_attention: unknown backend {backend!r}; choose from "
                         f"{('auto', *BACKENDS)}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                               or splits < 1):
        raise ValueError(f"decode_attention: splits must be an int >= 1, got {splits!r}")
    if splits is not None and backend in ("fused", "reference"):
        raise ValueError(f"decode_attention: splits={splits} applies to the 'split' backend "
                         f"(and 'triton'), not {backend!r}")
    if backend == "triton":  # the dispatcher's conditions (CUDA or the interpreter), ours
        return choose("decode_attention", backend, BACKENDS, q, k_cache, v_cache,
                      limits=lambda name: triton_limits(q, k_cache, v_cache))
    if backend == "auto":
        if _auto_takes_triton(q, k_cache, v_cache):
            return "triton"
        return "fused" if splits is None and fused_kernel_device(q.device) else "split"
    if backend == "fused" and not _sdpa_takes_gqa():
        raise ValueError("decode_attention: the 'fused' backend needs SDPA's enable_gqa "
                         "(torch >= 2.5)")
    return backend


def triton_limits(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str | None:
    """Why the Triton kernel cannot serve this call (None: it can). It is inference-only
    and computes in float32 (fp32/fp16/bf16 inputs)."""
    if needs_grad(q, k_cache, v_cache):
        return ("the triton decode kernel is inference-only (no backward): call it under "
                "torch.no_grad() or torch.inference_mode(), or use backend='split'")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (f"the triton decode kernel takes float32, float16 and bfloat16, got "
                f"{q.dtype}; use backend='split'")
    return None


def _split_kv(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, splits: int | None, causal: bool,
              mask: Tensor | None, scale: float | None, probe: bool,
              backend: str = "auto") -> Tensor | None:
    """The computation of ``decode_attention`` (see there).

    ``probe``: the inputs have not been cleared of non-finite keys; compute anyway and return
    None if a non-finite number showed. A key holding inf or NaN makes its scores non-finite
    (for any finite query), seen in their sum before masking; a value holding one makes every
    output row non-finite, whatever its weight, as the matmul computes 0 x inf = NaN (IEEE
    arithmetic, which the BLAS kernels keep: a masked or underflowed weight is a multiply
    like any other). Two sums instead of a pass over the cache of their own.
    """
    b, h, lq, _ = q.shape
    backend = _backend(backend, splits, q, k_cache, v_cache)
    if backend == "reference":  # guarded itself: nothing for the probe to do
        return softmax_attention(q, k_cache, v_cache, causal=causal, mask=mask, scale=scale,
                                 backend="reference")
    seen: Tensor | None
    if backend == "triton":  # causal and the mask applied in the kernel (no (Lq, T) mask)
        from attnlab.ops.triton.decode import decode

        out, seen = decode(q, k_cache, v_cache, causal=causal, mask=mask,
                           scale=default_scale(q, scale), splits=splits)
    else:
        # one query at the end of the cache sees every key: no causal mask to build or apply
        vis = visibility(lq, k_cache.shape[2], causal=causal and lq > 1, mask=mask,
                         device=q.device)
        if backend == "fused":
            out, seen = _fused(q, k_cache, v_cache, vis, scale, probe)
        else:  # on a CPU one segment by default (its threads share the matmuls anyway)
            out, seen = _own_segments(q, k_cache, v_cache, vis, splits or 1, scale, probe)
    if probe and not math.isfinite((out + cast(Tensor, seen)).sum().item()):
        return None
    return out.reshape(b, h, lq, -1).to(q.dtype)


def _merged_segments(q: Tensor, k: Tensor, v: Tensor, vis: Tensor | None, splits: int,
                     probe: bool) -> tuple[Tensor, Tensor | None]:
    """The attention of the scaled queries q (B, H, R, D) over k, v (B, H, T, D) computed in
    ``splits`` segments and merged exactly, (B, H, R, Dv); and (``probe``) the sum of the
    scores before masking."""
    total = k.shape[2]
    seg = -(-total // min(splits, max(total, 1))) if total else 1
    full = total // seg
    stats = []  # (max, sum-exp, unnormalised partial output) per segment, (B, H_kv, n, R, .)
    if full:  # the equal segments, as views of the cache (no copy)
        stats.append(_segments(q, k[:, :, :full * seg], v[:, :, :full * seg],
                               None if vis is None else vis[..., :full * seg], full, probe))
    if total - full * seg or not full:  # the shorter last segment (or an empty cache)
        stats.append(_segments(q, k[:, :, full * seg:], v[:, :, full * seg:],
                               None if vis is None else vis[..., full * seg:], 1, probe))
    m, l_sum, u, score_sum = (torch.cat(parts, 2) if len(parts) > 1 else parts[0]
                              for parts in zip(*stats, strict=True))
    if m.shape[2] == 1:  # one segment: nothing to merge
        out = (u / l_sum.clamp_min(1e-30)).squeeze(2)
    else:
        shift, _ = shifted_exp(m, 2)  # exp(m_s - M); 0 for an empty segment
        out = (shift * u).sum(2) / (shift * l_sum).sum(2).clamp_min(1e-30)
    return out, score_sum.sum() if probe else None


def _unless_nonfinite(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, splits: int | None = None,
                      causal: bool = False, mask: Tensor | None = None,
                      scale: float | None = None, backend: str = "auto") -> Tensor | None:
    return _split_kv(q, k_cache, v_cache, splits=splits, causal=causal, mask=mask, scale=scale,
                     probe=True, backend=backend)


@guarded_op("decode_attention", first=_unless_nonfinite)
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, splits: int | None = None,
                     causal: bool = False, mask: Tensor | None = None,
                     scale: float | None = None, backend: str = "auto") -> Tensor:
    """Softmax attention of a few queries over a long cache, computed in ``splits`` segments.
    ``splits=None`` (default): on a CPU one segment (its threads already share each matmul);
    on an accelerator one call of SDPA's fused kernels (``fused_kernel_device``), which split
    the cache themselves.

    ``q`` (B, H, Lq, D), ``k_cache``/``v_cache`` (B, H_kv, T, D); ``mask`` bool, True = may
    attend, broadcastable to (B, H, Lq, T); ``causal`` aligns the queries to the end of the
    cache. The segments have equal length (plus one shorter last segment) and are computed
    together (views of the cache, one batched matmul for the scores and one for the partial
    outputs), then merged exactly; GQA never copies the cache. Rows with no visible key
    return 0. Returns (B, H, Lq, Dv) in q's dtype.

    The cache is read once on a CPU: whether it holds a non-finite number is found from the
    scores and the output (``_split_kv``'s probe; the fused path sums the cache, a cheap pass
    on a GPU); only then is it cleared of such keys and the step
    computed again (``guarded_op``).

    ``backend``: ``"split"`` (the segments above, any device), ``"fused"`` (SDPA's fused
    kernels), ``"reference"`` (``softmax_attention``'s dense reference), ``"triton"``
    (``ops/triton/decode.py``: one program per segment and kv head with the GQA query heads
    packed as its rows, then an exact merge kernel; CUDA, or the CPU under Triton's
    interpreter; inference only, float32/16 and bfloat16; ``splits=None`` chooses from the
    cache length) or ``"auto"`` (triton on CUDA where it can serve the call, else fused on
    an accelerator when ``splits`` is None, else split).
    """
    return cast(Tensor, _split_kv(q, k_cache, v_cache, splits=splits, causal=causal, mask=mask,
                                  scale=scale, probe=False, backend=backend))


def _segments(q: Tensor, k: Tensor, v: Tensor, vis: Tensor | None, n_seg: int, probe: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Statistics of ``n_seg`` equal segments of k, v (B, H, n_seg * seg, D) for the scaled
    queries q (B, H, R, D): the row max m_s, the sum of exp(s - m_s) and the unnormalised
    partial output sum_j exp(s_j - m_s) v_j, each (B, H, n_seg, R, .), and (``probe``) the
    sum of the scores before masking, shaped to concatenate along dim 2 (else an empty
    tensor). A segment with no visible key gives (-inf, 0, 0). One batched matmul over views
    of the segments for the scores and one for the outputs (the cache is never copied)."""
    s = q.unsqueeze(2) @ k.unflatten(2, (n_seg, -1)).transpose(-1, -2)  # (B, H, n, R, seg)
    score_sum = s.sum().reshape(1, 1, 1) if probe else s.new_empty(1, 1, 0)
    if vis is not None:
        s = s.masked_fill(~vis.unflatten(-1, (n_seg, -1)).transpose(2, 3), float("-inf"))
    p, top = shifted_exp(s)
    return top, p.sum(-1, keepdim=True), p @ v.unflatten(2, (n_seg, -1)), score_sum
