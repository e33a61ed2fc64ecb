"""Multi-head self-attention convolution (TiC): attention inside a convolution window."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.neighborhood import NeighborhoodAttention, per_axis
from attnlab.modules.projections import QKVProjection
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_visibility
from attnlab.ops.softmax import softmax_weights

BORDERS = ("zeros", "clip")


class _BiasedQKV(QKVProjection):
    """q, k, v with their own bias setting (the official 1x1 qkv convolution has a bias
    whatever the module's ``bias``)."""

    def __init__(self, shape: HeadShape, *, qkv_bias: bool) -> None:
        super().__init__(replace(shape, bias=qkv_bias))


@register("msa_conv", family="local", paper="TiC: Exploring Vision Transformer in Convolution",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n k^2 d", weights=True, cross=False,
          variants=({"kernel_size": 5, "dilation": 2}, {"kernel_size": 3, "heads_per_channel":
                                                       True}))
class MSAConvAttention(NeighborhoodAttention):
    """Self-attention over each query's convolution window, zero padding included.

    "TiC: Exploring Vision Transformer in Convolution" (official MSA_Conv_2d,
    StriveZs/MSA-Conv): the k x k window of a stride-1 convolution with dilation d and zero
    padding p = d (k - 1) // 2 per axis defines the keys of query i. A window position off the
    image is a zero-padded key and value, so it takes part in the softmax with score 0:

        O_i = sum_{j in W(i)} e^{s_ij} v_j / (sum_{j in W(i)} e^{s_ij} + z_i),  s_ij = c q_i.k_j

    W(i) the in-image window positions {i - p + d o : 0 <= o < k} per axis, z_i the number of
    its positions off the image, c = D^-1/2 (the official single head: heads=1, D = C).
    ``border="clip"`` drops the off-image positions instead (z_i = 0, the window centred by
    k // 2: the earlier attnlab rule). Padded tokens (key padding mask) are no keys at all,
    neither keys nor zeros. The q, k, v projections have a bias (the official 1x1 qkv
    convolution; ``qkv_bias=None`` follows ``bias``). The paper's window kinds map to
    arguments: standard (``dilation=1``), dilated (``dilation > 1``) and depthwise (one
    channel per head: ``heads_per_channel=True`` sets heads = dim with head_dim 1). A
    sequence is a 1-D window. The zero border runs the neighborhood op on the grid padded by
    the window's reach, and reads the image's positions back.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        **NeighborhoodAttention.arguments,
        "heads_per_channel": Arg("bool"),
        "border": Arg("str", choices=BORDERS),
        "qkv_bias": Arg("bool", optional=True),
    }

    def __init__(self, dim: int, heads: int, *, kernel_size: int = 3, dilation: int = 1,
                 heads_per_channel: bool = False, border: str = "zeros",
                 qkv_bias: bool | None = True, **kwargs) -> None:
        if heads_per_channel:
            heads, kwargs["head_dim"] = dim, 1
            kwargs.pop("kv_heads", None)
        if qkv_bias is not None and "projection" not in kwargs:
            kwargs["projection"] = lambda shape: _BiasedQKV(shape, qkv_bias=qkv_bias)
        super().__init__(dim, heads, kernel_size=kernel_size, dilation=dilation, **kwargs)
        if any(s != 1 for s in per_axis(self.stride)) or any(self.causal_axes or ()):
            raise ValueError(f"msa_conv: convolution windows take neither a stride nor causal "
                             f"axes, got stride={self.stride!r}, "
                             f"causal_axes={self.causal_axes!r}")
        self.border = border

    def _axes(self, call: Call, length: int) -> dict:
        # the op rejects a stride or causal axes together with convolution windows
        return super()._axes(call, length) | {"border": "clip"}

    # ------------------------------------------------------------------ the zero border
    def _reach(self, spatial: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
        """Per axis (q before, q after, k before, k after): the padding that puts every
        window position on the grid. The op centres a clipped window on its query by
        k // 2 steps; the official window starts d (k - 1) // 2 before it (the same for odd
        k), so q and k are padded by those amounts and their image positions line up."""
        n = len(spatial)
        kernels = per_axis(self.kernel_size)
        dilations = per_axis(self.dilation)
        kernels, dilations = kernels * (n // len(kernels)), dilations * (n // len(dilations))
        reach = []
        for k, d in zip(kernels, dilations, strict=True):
            k_lo = d * (k - 1) // 2
            reach.append(((k // 2) * d, (k - 1 - k // 2) * d, k_lo, (k - 1) * d - k_lo))
        return reach

    @staticmethod
    def _pad(t: Tensor, pads: list[tuple[int, int]], value: float = 0.0) -> Tensor:
        """Pad the spatial axes of (B, H, *spatial, D) (or (B, *spatial) with ``value``)."""
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]
        return F.pad(t, (0, 0, *flat) if t.dim() == len(pads) + 3 else tuple(flat),
                     value=value)

    def _padded(self, q: Tensor, k: Tensor, v: Tensor, call: Call):
        """q, k, v (B, H, *padded, D), the padded key mask (or None), the padded grid and
        the reach per axis."""
        spatial = tuple(call.spatial or (q.shape[2],))
        self._axes(call, q.shape[2])  # checks the per-axis settings against the input
        reach = self._reach(spatial)
        grid = tuple(n + r[0] + r[1] for n, r in zip(spatial, reach, strict=True))
        b = q.shape[0]
        qp = self._pad(q.reshape(b, q.shape[1], *spatial, -1), [r[:2] for r in reach])
        kp, vp = (self._pad(t.reshape(b, t.shape[1], *spatial, -1), [r[2:] for r in reach])
                  for t in (k, v))
        mask = None
        if call.key_mask is not None:  # the zeros take part, padded tokens do not
            real = call.key_mask.reshape(b, *spatial).to(torch.uint8)
            mask = self._pad(real, [r[2:] for r in reach], value=1).bool()
        return qp, kp, vp, mask, grid, reach

    @staticmethod
    def _image(grid: tuple[int, ...], spatial: tuple[int, ...], starts: list[int],
               device) -> Tensor:
        """Flat indices, in the padded grid, of the image positions starting at ``starts``."""
        index = torch.arange(math.prod(grid), device=device).reshape(grid)
        for axis, (start, n) in enumerate(zip(starts, spatial, strict=True)):
            index = index.narrow(axis, start, n)
        return index.reshape(-1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        if self.border == "clip":
            return super().attend(q, k, v, call)
        spatial = tuple(call.spatial or (q.shape[2],))
        qp, kp, vp, mask, grid, reach = self._padded(q, k, v, call)
        out = neighborhood_attention(qp, kp, vp, kernel_size=self.kernel_size,
                                     dilation=self.dilation, border="clip", mask=mask,
                                     backend=self.backend)
        for axis, (start, n) in enumerate(zip([r[0] for r in reach], spatial, strict=True)):
            out = out.narrow(2 + axis, start, n)
        return out.reshape(q.shape[0], q.shape[1], -1, v.shape[-1])

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        if self.border == "clip":
            return super().attention_weights(q, k, call)
        spatial = tuple(call.spatial or (q.shape[2],))
        qp, kp, _, mask, grid, reach = self._padded(q, k, k, call)
        vis = neighborhood_visibility(grid, kernel_size=self.kernel_size,
                                      dilation=self.dilation, border="clip", device=q.device)
        if mask is not None:
            vis = vis[None, None] & mask.reshape(q.shape[0], 1, 1, -1)
        b = q.shape[0]
        w = softmax_weights(qp.reshape(b, qp.shape[1], -1, qp.shape[-1]),
                            kp.reshape(b, kp.shape[1], -1, kp.shape[-1]), mask=vis)
        rows = self._image(grid, spatial, [r[0] for r in reach], q.device)
        cols = self._image(grid, spatial, [r[2] for r in reach], q.device)
        return w.index_select(2, rows).index_select(3, cols)
