"""Generalized neighborhood attention in 1-D, 2-D and 3-D.

"Generalized Neighborhood Attention" / "Faster Neighborhood Attention" (Hassani et al.):
each query attends to a window of keys around it, independently per spatial axis. On an
axis of length L with kernel K, dilation d and stride S, query i lives in the dilation group
g = i mod d, at position i' = i // d of a group of length L_g = ceil((L - g) / d), and sees
the keys j = g + d j' with j' in

    non-causal: leader = min((i' // S) S + S // 2, L_g - 1),
                start = min(max(leader - K // 2, 0), L_g - K),   j' in [start, start + K)
    causal:     leader = min((i' // S) S + S - 1, L_g - 1),
                j' in [max(leader - K + 1, 0), i']

(K is clamped to L_g, so a short axis is attended in full). A query sees the product of its
per-axis windows. S = 1 is neighborhood attention, S = K blocked (window) attention, K = L
full attention; every non-causal query sees exactly prod_a min(K_a, L_g) keys.

Backends:

- ``reference``: the dense boolean mask and softmax attention (O(L^2) memory);
- ``tiled``: queries are cut into tiles of ``block`` positions per axis (inside one dilation
  group); a tile's keys are the union of its queries' windows, a range of W ~ block + K - 1
  positions per axis. Scores are (tiles, block, W) matmuls, so time and memory grow with
  L * W, i.e. with L * K, never with L^2; backward is autograd over the same tiles;
- ``flex``: FlexAttention with a block mask computed from the window rule (the CUDA path).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.arguments import check_arguments
from attnlab.ops.common import (
    COMMON_OPTIONS,
    constant_geometry,
    default_scale,
    expand_kv,
    hide_nonfinite,
    nan_where,
    tracing,
    unit_last_stride,
)
from attnlab.ops.dispatch import choose, needs_grad

# in order of preference for backend="auto" (which takes "triton" on CUDA only: see
# attnlab.ops.triton.why_not)
BACKENDS = ("triton", "flex", "tiled", "reference")
# queries per tile of the 1-D sliding-window path, measured on the 2-core CPU at L = 16k
# (tiles of 16 to 256): inference is fastest with 32 for K = 31 to 511; training, whose
# backward writes and folds gradients of the (tile, W) key windows, W / B times k's size,
# with 64 (467 ms at K = 128 against 551 with 32)
SLIDING_BLOCK = {"inference": 32, "train": 64}


def _per_axis(value, n: int, name: str, kind: type, op: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{op}: {name} has {len(values)} entries for {n} spatial axes")
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{op}: {name} must be positive ints, got {value!r}")
        if kind is bool and not isinstance(v, bool):
            raise ValueError(f"{op}: {name} must be bools, got {value!r}")
    return values


@dataclass(frozen=True)
class AxisRule:
    """The window rule on one axis."""

    length: int
    kernel: int
    dilation: int
    stride: int
    causal: bool
    clip: bool = False  # convolution windows: centred, cut at the borders (no shift)

    def values(self) -> tuple[int, int, int, int, bool, bool]:
        """The fields, ``AxisRule(*rule.values()) == rule`` (plain values, which tracing
        takes as constants where it cannot take the rule)."""
        return (self.length, self.kernel, self.dilation, self.stride, self.causal, self.clip)

    def windows(self, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For every position i: (group g, position i' in the group, start, end) with the
        visible keys j = g + d j', start <= j' < end (group coordinates)."""
        d, s = self.dilation, self.stride
        i = torch.arange(self.length, device=device)
        g, ip = i % d, i // d
        group_len = (self.length - g + d - 1) // d
        k = torch.clamp(group_len, max=self.kernel)
        if self.clip:
            start = torch.clamp(ip - self.kernel // 2, min=0)
            end = torch.minimum(ip - self.kernel // 2 + self.kernel, group_len)
        elif self.causal:
            leader = torch.minimum((ip // s) * s + s - 1, group_len - 1)
            start = torch.clamp(leader - k + 1, min=0)
            end = ip + 1
        else:
            leader = torch.minimum((ip // s) * s + s // 2, group_len - 1)
            start = torch.minimum(torch.clamp(leader - k // 2, min=0), group_len - k)
            end = start + k
        return g, ip, start, end

    def visibility(self, device=None) -> Tensor:
        """(L, L) bool: query i may see key j on this axis."""
        g, _, start, end = self.windows(device)
        j = torch.arange(self.length, device=device)
        jp = j // self.dilation
        same = g[:, None] == (j % self.dilation)[None, :]
        return same & (start[:, None] <= jp[None, :]) & (jp[None, :] < end[:, None])


def _rules(spatial: tuple[int, ...], kernel_size, dilation, stride, causal,
           border: str = "shift", op: str = "neighborhood_attention") -> list[AxisRule]:
    if border not in ("shift", "clip"):
        raise ValueError(f"{op}: border must be 'shift' or 'clip', got {border!r}")
    n = len(spatial)
    ks = _per_axis(kernel_size, n, "kernel_size", int, op)
    ds = _per_axis(dilation, n, "dilation", int, op)
    ss = _per_axis(stride, n, "stride", int, op)
    cs = _per_axis(causal, n, "causal", bool, op)
    for k, s in zip(ks, ss, strict=True):
        if s > k:
            raise ValueError(f"{op}: stride ({s}) must not exceed kernel_size ({k})")
    if border == "clip" and (any(cs) or any(s != 1 for s in ss)):
        raise ValueError(f"{op}: border='clip' (convolution windows) takes neither causal "
                         "nor stride")
    return [AxisRule(L, k, d, s, c, border == "clip")
            for L, k, d, s, c in zip(spatial, ks, ds, ss, cs, strict=True)]


def neighborhood_visibility(spatial: Sequence[int], *, kernel_size, dilation=1, stride=1,
                            causal=False, border: str = "shift", device=None) -> Tensor:
    """The (L, L) bool mask of generalized neighborhood attention, L = prod(spatial)."""
    op = "neighborhood_visibility"
    if not isinstance(spatial, Sequence) or not spatial or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in spatial):
        raise ValueError(f"{op}: spatial must be a non-empty sequence of ints >= 1, got "
                         f"{spatial!r}")
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{op}: device={device!r} is not a device ({err})") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{op}: device={str(device)!r}, but this torch has no CUDA device")
    spatial = tuple(spatial)
    rules = _rules(spatial, kernel_size, dilation, stride, causal, border, op)
    vis = None
    n = len(rules)
    for a, rule in enumerate(rules):
        m = rule.visibility(device)  # (L_a, L_a): broadcast to (*spatial, *spatial)
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = rule.length, rule.length
        m = m.view(shape)
        vis = m if vis is None else vis & m
    total = math.prod(spatial)
    assert vis is not None  # at least one axis
    return vis.reshape(total, total)


# --------------------------------------------------------------------------- tiled backend
@dataclass
class AxisTiles:
    """One axis cut into tiles: query and key positions per tile and their visibility."""

    q_index: Tensor  # (T, block) positions on the axis (clamped where invalid)
    k_index: Tensor  # (T, W)
    visible: Tensor  # (T, block, W) bool
    tile_of: Tensor  # (L,) tile holding each position's query
    slot_of: Tensor  # (L,) its slot in the tile


def _axis_tiles(rule: AxisRule, block: int, device) -> AxisTiles:
    """One axis cut into tiles of ``block`` query positions (traced: a constant)."""
    return AxisTiles(*_axis_tiles_of(rule.values(), block, device))


@constant_geometry
def _axis_tiles_of(fields: tuple, block: int, device) -> tuple[Tensor, ...]:
    """:func:`_axis_tiles` of the rule given by its fields (plain values, which tracing takes
    as constants), as a tuple."""
    rule = AxisRule(*fields)
    d = rule.dilation
    g, ip, start, end = rule.windows(device)
    length = rule.length
    group_len = torch.tensor([(length - r + d - 1) // d for r in range(d)], device=device)
    n_blocks = -(-int(group_len.max()) // block)
    groups = torch.arange(d, device=device)[:, None, None]  # (d, 1, 1)
    qp = torch.arange(n_blocks, device=device)[None, :, None] * block + \
        torch.arange(block, device=device)[None, None, :]  # (1, nb, block) group coords
    q_valid = qp < group_len[:, None, None]  # (d, nb, block)
    q_pos = (groups + d * qp).clamp(max=length - 1)  # axis coords
    q_start = torch.where(q_valid, start[q_pos], torch.iinfo(torch.long).max)
    q_end = torch.where(q_valid, end[q_pos], -1)
    lo = q_start.amin(-1)  # (d, nb): union of the tile's windows
    hi = q_end.amax(-1)
    has = q_valid.any(-1)
    width = int(torch.where(has, hi - lo, 0).max())
    width = max(width, 1)
    lo = torch.where(has, lo, 0)
    lo = torch.clamp(torch.minimum(lo, group_len[:, None] - width), min=0)
    kp = lo[..., None] + torch.arange(width, device=device)  # (d, nb, W)
    k_valid = kp < group_len[:, None, None]
    k_pos = (groups + d * kp).clamp(max=length - 1)
    # invalid query slots have start = +max and end = -1, so they see nothing
    visible = (k_valid[..., None, :] & (q_start[..., None] <= kp[..., None, :])
               & (kp[..., None, :] < q_end[..., None]))
    tiles = d * n_blocks
    return (q_pos.reshape(tiles, block), k_pos.reshape(tiles, width),
            visible.reshape(tiles, block, width), g * n_blocks + ip // block, ip % block)


def _linear_index(axis_idx: list[Tensor], spatial: list[int]) -> Tensor:
    """Per-axis (T_a, X_a) positions -> flat positions (T_1..T_n, X_1..X_n) -> (T * X,)."""
    n = len(axis_idx)
    flat = None
    for a, idx in enumerate(axis_idx):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = idx.shape
        term = idx.view(shape) * math.prod(spatial[a + 1:])
        flat = term if flat is None else flat + term
    assert flat is not None  # at least one axis
    return flat.reshape(-1)


def _combine_visibility(tiles: list[AxisTiles]) -> Tensor:
    """AND of the per-axis (T_a, block_a, W_a) masks -> (T, block, W)."""
    n = len(tiles)
    vis = None
    for a, t in enumerate(tiles):
        shape = [1] * (3 * n)
        shape[a], shape[n + a], shape[2 * n + a] = t.visible.shape
        m = t.visible.view(shape)
        vis = m if vis is None else vis & m
    t_count = math.prod([t.visible.shape[0] for t in tiles])
    b_count = math.prod([t.visible.shape[1] for t in tiles])
    w_count = math.prod([t.visible.shape[2] for t in tiles])
    assert vis is not None  # at least one axis
    return vis.reshape(t_count, b_count, w_count)


def _default_block(rule: AxisRule, dims: int) -> int:
    """Tile edge: a multiple of the stride; the kernel per axis in 2-D / 3-D, and in 1-D the
    kernel clamped to [64, 256] rows (measured fastest on CPU; attnlab bench run ops)."""
    s = rule.stride
    k = min(rule.kernel, rule.length)
    base = min(max(k, 64), 256) if dims == 1 else k
    return s * -(-base // s)


def _tile_bias(vis: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The additive SDPA bias of a (.., B, W) tile visibility (0 or -inf) and its rows that
    see no key (.., B, 1): padding slots of border tiles, or every key masked. Those rows get
    a zero bias (no NaN); their outputs are to be zeroed."""
    empty = ~vis.any(-1, keepdim=True)
    bias = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill(
        ~(vis | empty), float("-inf"))
    return bias, empty


def _tile_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, empty: Tensor | None,
                    scale: float) -> Tensor:
    """SDPA over tiles (H, tiles, B, D) x (H, tiles, W, D) with a (tiles or 1, B, W) bias
    shared by the heads; the rows marked ``empty`` (tiles, B, 1) give 0."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=scale)
    return out if empty is None else out.masked_fill(empty[None], 0.0)


@constant_geometry
def _sliding_geometry(fields: tuple, kernel: int, block: int, shared: bool, device
                      ) -> tuple[int, int, int, Tensor, Tensor, Tensor, Tensor]:
    """The tiles of :func:`_sliding_1d` (a function of the window rule and the block only,
    a constant when traced): the first and last affine tile and their count, the border
    tiles, and for the tiles whose visibility is built (the border ones and the first affine
    one when ``shared``, else all) their query and key positions and visibility (T', B, W)."""
    rule = AxisRule(*fields)  # plain values in (which tracing takes as constants)
    length = rule.length
    width = block + kernel - 1
    n_tiles = -(-length // block)
    lead = kernel - 1 if rule.causal else kernel // 2
    tile = torch.arange(n_tiles, device=device)
    start = (tile * block - lead).clamp(0, length - width)  # (T,) first key of each tile
    affine = (start == tile * block - lead) & ((tile + 1) * block <= length)
    regular = tile[affine]
    first, last = (int(regular[0]), int(regular[-1])) if len(regular) else (0, -1)
    border = torch.cat([tile[:first], tile[last + 1:]])
    built = torch.cat([border, regular[:1]]) if shared else tile
    _, _, w_start, w_end = rule.windows(device)
    q_pos = built[:, None] * block + torch.arange(block, device=device)  # (T', B)
    k_pos = start[built][:, None] + torch.arange(width, device=device)  # (T', W)
    real = q_pos < length
    q_pos = q_pos.clamp(max=length - 1)
    vis = (real[..., None] & (w_start[q_pos][..., None] <= k_pos[:, None, :])
           & (k_pos[:, None, :] < w_end[q_pos][..., None]))  # (T', B, W)
    return first, last, len(regular), border, q_pos, k_pos, vis


def _sliding_1d(q: Tensor, k: Tensor, v: Tensor, rule: AxisRule, key_mask: Tensor | None,
                scale: float, block: int) -> Tensor | None:
    """The tiled backend on one axis without dilation or stride, borders shifted (not
    clipped), with key windows that are views of k and v instead of gathered copies.

    Tile t holds the queries [t B, t B + B) and sees the keys [s_t, s_t + W), W = B + K - 1,
    s_t = clamp(t B - a, 0, L - W) with a = K - 1 (causal) or K // 2: the union of its
    queries' windows. Where the clamp is idle (every tile but a few at the borders) s_t is
    affine in t, so those tiles' keys are ``unfold`` views of k and v and their queries a
    view of q; the border tiles are gathered. One SDPA call per batch element for each kind,
    with the tiles as SDPA's head axis and one (tile, query, key) bias for every head.
    None when the axis is too short for more than one window (the general path serves).
    """
    b, h, length = q.shape[:3]
    kernel = min(rule.kernel, length)
    width = block + kernel - 1
    if width >= length:
        return None
    q, k, v = unit_last_stride(q, k, v)  # the tiles are views: SDPA's fused kernel needs it
    lead = kernel - 1 if rule.causal else kernel // 2
    # Without a key mask every affine tile sees its keys alike, so one (B, W) bias serves
    # them all: the visibility is built for the border tiles and the first affine one only
    # (for all tiles it cost ~10% of the call at 16k). A key mask differs per tile.
    shared = key_mask is None
    first, last, n_regular, border, q_pos, k_pos, vis = _sliding_geometry(
        rule.values(), kernel, block, shared, q.device)
    regular = range(n_regular)  # only its length is read below
    # rows of `vis` (and of the bias) for the border tiles and for the affine ones
    at_border = slice(0, len(border)) if shared else border
    affine_rows = slice(len(border), len(border) + 1) if shared else slice(first, last + 1)
    out = q.new_empty(b, h, length, v.shape[-1])
    unmasked = _tile_bias(vis, q.dtype) if shared else None  # the same for every i
    for i in range(b):
        bias, empty = unmasked or _tile_bias(vis & cast(Tensor, key_mask)[i][k_pos][:, None, :],
                                                   q.dtype)
        if len(regular):
            n_reg = last + 1 - first
            span = slice(first * block, (last + 1) * block)
            k_r, v_r = (x[i][:, first * block - lead:].unfold(1, width, block)[:, :n_reg]
                        .transpose(-1, -2) for x in (k, v))
            out[i, :, span] = _tile_attention(q[i][:, span].unflatten(1, (n_reg, block)), k_r,
                                              v_r, bias[affine_rows],
                                              None if shared else empty[affine_rows],
                                              scale).flatten(1, 2)
        if len(border):
            q_b = q[i].index_select(1, q_pos[at_border].reshape(-1)).unflatten(1, (-1, block))
            k_b, v_b = (x[i].index_select(1, k_pos[at_border].reshape(-1))
                        .unflatten(1, (-1, width)) for x in (k, v))
            out_b = _tile_attention(q_b, k_b, v_b, bias[at_border],
                                    None if shared else empty[at_border],
                                    scale).flatten(1, 2)
            front = first * block if len(regular) else 0
            back = (last + 1) * block if len(regular) else 0
            out[i, :, :front] = out_b[:, :front]
            out[i, :, back:] = out_b[:, front:front + length - back]
    return out


def _tiled(q: Tensor, k: Tensor, v: Tensor, rules: list[AxisRule], key_mask: Tensor | None,
           scale: float, block: int | tuple[int, ...] | None) -> Tensor:
    n = len(rules)
    if n == 1 and rules[0].dilation == rules[0].stride == 1 and not rules[0].clip:
        if block is None:
            bl = SLIDING_BLOCK["train" if needs_grad(q, k, v) else "inference"]
        else:
            bl = _per_axis(block, 1, "block", int, "neighborhood_attention")[0]
        out = _sliding_1d(q, k, v, rules[0], key_mask, scale, bl)
        if out is not None:
            return out
    b, h = q.shape[:2]
    spatial = [r.length for r in rules]
    total = math.prod(spatial)
    blocks = (tuple(_default_block(r, n) for r in rules) if block is None
              else _per_axis(block, n, "block", int, "neighborhood_attention"))
    tiles = [_axis_tiles(r, bl, q.device) for r, bl in zip(rules, blocks, strict=True)]
    t_count = math.prod([t.q_index.shape[0] for t in tiles])
    q_flat = _linear_index([t.q_index for t in tiles], spatial)  # (T * block,)
    k_flat = _linear_index([t.k_index for t in tiles], spatial)  # (T * W,)
    per_batch = torch.arange(b, device=q.device)[:, None] * total

    def gather(x: Tensor, flat: Tensor) -> Tensor:
        # heads first, so that one (batch, tile) mask serves every head: (H, B * T, X, D)
        x = x.transpose(0, 1).reshape(h, b * total, x.shape[-1])
        x = x.index_select(1, (per_batch + flat).reshape(-1))
        return x.view(h, b * t_count, -1, x.shape[-1])

    q_t, k_t, v_t = gather(q, q_flat), gather(k, k_flat), gather(v, k_flat)
    vis = _combine_visibility(tiles)[None]  # (1, T, block, W)
    if key_mask is not None:
        km = key_mask.reshape(b, total).index_select(1, k_flat)
        vis = vis & km.view(b, t_count, 1, -1)
    bias, empty = _tile_bias(vis, q.dtype)
    bias = bias.expand(b, *bias.shape[1:]).reshape(1, b * t_count, *bias.shape[2:])
    out_t = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=bias, scale=scale)
    if key_mask is not None:  # rows whose keys are all padding give 0
        out_t = out_t.masked_fill(empty.view(1, b * t_count, -1, 1), 0.0)
    # each position reads its output back from (its tile, its slot)
    blocks_per_tile = math.prod([t.q_index.shape[1] for t in tiles])
    tile_flat = _linear_index([t.tile_of[None, :] for t in tiles],
                              [t.q_index.shape[0] for t in tiles])
    slot_flat = _linear_index([t.slot_of[None, :] for t in tiles],
                              [t.q_index.shape[1] for t in tiles])
    where = tile_flat * blocks_per_tile + slot_flat  # (total,)
    per_batch_out = torch.arange(b, device=q.device)[:, None] * (t_count * blocks_per_tile)
    out = out_t.reshape(h, -1, out_t.shape[-1]).index_select(
        1, (per_batch_out + where).reshape(-1))
    return out.view(h, b, *spatial, out.shape[-1]).transpose(0, 1)


# ------------------------------------------------------------------------------ flex backend
def _window_mask_mod(rules: tuple[AxisRule, ...], key_mask: Tensor | None, device) -> Callable:
    """FlexAttention's mask_mod of the window rule on the flattened positions."""
    spatial = [r.length for r in rules]
    windows = []
    for r in rules:
        g, _, start, end = r.windows(device)
        windows.append((g, start, end))
    strides = [math.prod(spatial[a + 1:]) for a in range(len(spatial))]
    flat_mask = None if key_mask is None else key_mask.reshape(key_mask.shape[0], -1)

    def mask_mod(bi, hi, q_idx, kv_idx):
        keep = q_idx >= 0
        for a, r in enumerate(rules):
            qa = (q_idx // strides[a]) % r.length
            ka = (kv_idx // strides[a]) % r.length
            g, start, end = windows[a]
            kp = ka // r.dilation
            keep = keep & (ka % r.dilation == g[qa]) & (start[qa] <= kp) & (kp < end[qa])
        if flat_mask is not None:
            keep = keep & flat_mask[bi, kv_idx]
        return keep

    return mask_mod


@functools.lru_cache(maxsize=32)
def _window_block_mask(rules: tuple[AxisRule, ...], device: str):
    """The block mask of a window rule without padding, broadcast over batch and heads; built
    once per rule and device (building it costs about as much as the attention)."""
    from attnlab.ops.flex import block_mask_of

    n = math.prod([r.length for r in rules])
    return block_mask_of(_window_mask_mod(rules, None, device), None, None, n, n, device)


def _flex(q: Tensor, k: Tensor, v: Tensor, rules: list[AxisRule], key_mask: Tensor | None,
          scale: float) -> Tensor:
    from attnlab.ops.flex import flex_masked

    b, h = q.shape[:2]
    flat = [t.reshape(b, h, -1, t.shape[-1]) for t in (q, k, v)]
    if key_mask is None:
        out = flex_masked(*flat, block_mask=_window_block_mask(tuple(rules), str(q.device)),
                          scale=scale)
    else:
        out = flex_masked(*flat, mask_mod=_window_mask_mod(tuple(rules), key_mask, q.device),
                          scale=scale)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def _reference(q: Tensor, k: Tensor, v: Tensor, rules: list[AxisRule], key_mask: Tensor | None,
               scale: float) -> Tensor:
    from attnlab.ops.softmax import softmax_weights

    b, h = q.shape[:2]
    spatial = [r.length for r in rules]
    vis = neighborhood_visibility(spatial, kernel_size=[r.kernel for r in rules],
                                  dilation=[r.dilation for r in rules],
                                  stride=[r.stride for r in rules],
                                  causal=[r.causal for r in rules],
                                  border="clip" if rules[0].clip else "shift", device=q.device)
    vis = vis[None, None]
    if key_mask is not None:
        vis = vis & key_mask.reshape(b, 1, 1, -1)
    flat = [t.reshape(b, h, -1, t.shape[-1]) for t in (q, k, v)]
    w = softmax_weights(flat[0], flat[1], mask=vis, scale=scale)
    return (w.to(v.dtype) @ flat[2]).reshape(*q.shape[:-1], v.shape[-1])


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, *, kernel_size, dilation=1,
                           stride=1, causal=False, border: str = "shift",
                           mask: Tensor | None = None,
                           scale: float | None = None, backend: str = "auto",
                           block: int | tuple[int, ...] | None = None) -> Tensor:
    """Generalized neighborhood attention on ``(B, H, *spatial, D)`` tensors (1 to 3 axes).

    ``kernel_size``, ``dilation``, ``stride`` and ``causal`` are one value for every axis or a
    tuple per axis. ``mask`` (B, *spatial) bool, True = real key (key padding: a full
    (Lq, Lk) mask would defeat the point of a local op). k, v may have fewer
    heads than q (GQA). ``border="clip"`` gives convolution windows instead: centred on the
    query, cut at the borders (fewer keys there), no stride or causal. Rows with no visible
    key give 0. ``block``: tile edge per axis for
    the tiled backend (default: about the kernel, rounded up to the stride) and for the
    triton one (powers of two whose product is 16 to 256; default per number of axes).
    Backends: ``reference`` (dense), ``tiled`` (window tiles), ``flex`` (a block mask),
    ``triton`` (``attnlab.ops.triton.neighborhood``: flash-style forward and backward kernels
    that visit only each query tile's window of key tiles, on CUDA or under Triton's
    interpreter).
    """
    op = "neighborhood_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or not 4 <= t.dim() <= 6:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be (B, H, *spatial, D) with 1 to 3 spatial "
                             f"axes, got {shape}")
    if not (q.dim() == k.dim() == v.dim()) or q.shape[2:-1] != k.shape[2:-1] or \
            k.shape[:-1] != v.shape[:-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must share batch and spatial shape")
    if q.shape[-1] != k.shape[-1] or 0 in (q.shape[1], k.shape[1]) or q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: q and k head dims must match and kv heads (at least one) "
                         f"divide q heads, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not q.is_floating_point():
        raise ValueError(f"{op}: q, k, v must be floating point, got {q.dtype}")
    check_arguments(op, COMMON_OPTIONS, {"scale": scale})
    spatial = tuple(q.shape[2:-1])
    key_mask = mask
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(
                key_mask.shape) not in (
                (q.shape[0], *spatial), (q.shape[0], math.prod(spatial))):
            got = (f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, Tensor)
                   else type(key_mask).__name__)
            raise ValueError(f"{op}: mask must be bool key padding of shape (B, *spatial) = "
                             f"{(q.shape[0], *spatial)}, got {got}")
        key_mask = key_mask.reshape(q.shape[0], *spatial)
    rules = _rules(spatial, kernel_size, dilation, stride, causal, border)
    if q.numel() == 0:  # no sequence or no token
        return v.new_zeros(*q.shape[:-1], v.shape[-1])
    backend = choose(op, backend, BACKENDS, q, k, v,
                     limits=lambda n: _triton_limits(q, v, rules, key_mask, block)
                     if n == "triton" else None)
    scale = default_scale(q, scale)
    k, v, bad = hide_nonfinite(k, v)  # a key outside every window never reaches the output
    if backend == "triton":  # GQA kv heads indexed in the kernels, never repeated
        from attnlab.ops.triton.neighborhood import neighborhood_attention_triton

        out = neighborhood_attention_triton(q, k, v, rules, key_mask, scale, block)
    else:
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        if backend == "reference":
            out = _reference(q, k, v, rules, key_mask, scale)
        elif backend == "flex":
            out = _flex(q, k, v, rules, key_mask, scale)
        else:
            out = _tiled(q, k, v, rules, key_mask, scale, block)
    # rare: NaN on the queries whose window holds a non-finite key (a second windowed pass,
    # skipped eagerly when no key is bad; traced, always taken: no host sync, one graph)
    if tracing() or bool(bad.any()):
        seen = _tiled(*(bad.new_zeros(*bad.shape, 1, dtype=torch.float32),) * 2,
                      bad.unsqueeze(-1).float(), rules, key_mask, 1.0, block)[..., 0] > 0
        out = out + nan_where(expand_kv(seen, q.shape[1]), out)
    return out


def _triton_limits(q: Tensor, v: Tensor, rules: Sequence[AxisRule], key_mask: Tensor | None,
                   block: int | tuple[int, ...] | None) -> str | None:
    """Why the triton kernels cannot serve this call (asked only once triton is known to
    import: the dispatcher's general conditions come first)."""
    from attnlab.ops.triton.neighborhood import triton_limits

    return triton_limits(q, v, rules, key_mask, block)
