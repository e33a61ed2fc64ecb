"""Neighborhood attention (1-D, 2-D, 3-D; generalized with dilation, stride, causal axes)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.core.state import State
from attnlab.mechanisms.base import Attention
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_visibility
from attnlab.ops.softmax import softmax_attention, softmax_weights


def per_axis(value: int | tuple[int, ...]) -> tuple[int, ...]:
    """A per-axis setting as a tuple (an int serves every axis)."""
    return value if isinstance(value, tuple) else (value,)

@register("neighborhood", family="local",
          paper="Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the "
                "Speed of Light", causal=True, bidirectional=True, decode=True,
          domains=("seq", "image", "video"), complexity="n k d", weights=True, cross=False,
          variants=({"kernel_size": 3, "dilation": 2}, {"kernel_size": 5, "kv_heads": 1}),
          notes="stride > 1 cannot decode (its causal window depends on the length); "
                "no relative position bias")
class NeighborhoodAttention(Attention):
    """Each token attends to the K nearest keys per axis (its neighborhood).

    "Neighborhood Attention Transformer", "Faster Neighborhood Attention" and "Generalized
    Neighborhood Attention" (SHI-Labs/NATTEN): O_i = softmax_{j in N(i)}(c q_i.k_j) v_j,
    N(i) the product over axes of the window rule of ``attnlab.ops.neighborhood``: kernel K,
    dilation d, stride S (S = 1 sliding neighborhoods, S = K blocked windows, K = L full
    attention), every non-causal query sees exactly K keys per axis (windows shift inwards at
    borders). A sequence is 1-D, ``(B, H, W, C)`` 2-D, ``(B, T, H, W, C)`` 3-D; ``kernel_size``,
    ``dilation`` and ``stride`` take one value for every axis or a tuple per axis;
    ``causal_axes`` makes single axes causal (default: ``causal`` on every axis). Causal
    sequences with stride 1 decode with a KV cache, reading only the last (K - 1) d + 1 keys.
    """

    backends = ("auto", "reference", "tiled", "flex")
    propagates_nonfinite = True  # its ops hide non-finite keys outside each window

    arguments: ClassVar[dict[str, Arg]] = {
        "kernel_size": Arg("int_or_ints", low=1),
        "dilation": Arg("int_or_ints", low=1),
        "stride": Arg("int_or_ints", low=1),
        "causal_axes": Arg("bools", optional=True),
    }

    def __init__(self, dim: int, heads: int, *, kernel_size: int | tuple[int, ...] = 7,
                 dilation: int | tuple[int, ...] = 1, stride: int | tuple[int, ...] = 1,
                 causal_axes: tuple[bool, ...] | None = None, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        # per-axis settings (declared in ``arguments``): a list (from a config file) as a tuple
        self.kernel_size, self.dilation, self.stride = (
            tuple(v) if isinstance(v, list) else v for v in (kernel_size, dilation, stride))
        self.causal_axes = None if causal_axes is None else tuple(causal_axes)
        kernels, strides = per_axis(self.kernel_size), per_axis(self.stride)
        if len(kernels) == 1 or len(strides) == 1 or len(kernels) == len(strides):
            n = max(len(kernels), len(strides))
            if any(s > k for k, s in zip(kernels * (n // len(kernels)),
                                         strides * (n // len(strides)), strict=True)):
                raise ValueError(f"{self.name}: stride must not exceed kernel_size, got "
                                 f"stride={stride!r}, kernel_size={kernel_size!r}")

    def _axes(self, call: Call, length: int) -> dict:
        spatial = call.spatial or (length,)
        n = len(spatial)
        causal = self.causal_axes if self.causal_axes is not None else (self.causal,) * n
        if len(causal) != n:
            raise ValueError(f"{self.name}: causal_axes has {len(causal)} entries for a "
                             f"{n}-D input")
        for name, value in (("kernel_size", self.kernel_size), ("dilation", self.dilation),
                            ("stride", self.stride)):
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{self.name}: {name}={value} has {len(value)} entries for "
                                 f"a {n}-D input of shape {spatial}")
        return dict(spatial=spatial, kernel_size=self.kernel_size, dilation=self.dilation,
                    stride=self.stride, causal=tuple(bool(c) for c in causal))

    def new_state(self, batch_size: int) -> State:
        strides = self.stride if isinstance(self.stride, tuple) else (self.stride,)
        if any(s != 1 for s in strides):
            raise ValueError("neighborhood: decoding needs stride=1 (with a larger stride a "
                             "causal window depends on the sequence length)")
        return super().new_state(batch_size)

    def _decode_window(self, q: Tensor, k_len: int, call: Call) -> tuple[int, Tensor]:
        """Decoding a sequence: first cached key worth reading and the (Lq, keys) window."""
        if call.spatial is not None:
            raise ValueError("neighborhood: decoding with a state works on sequences only")
        kernel, dilation = self._axes(call, q.shape[2])["kernel_size"], self.dilation
        kernel = kernel[0] if isinstance(kernel, tuple) else kernel
        dilation = dilation[0] if isinstance(dilation, tuple) else dilation
        pos = call.index
        first = max(int(pos[0]) - (kernel - 1) * dilation, 0)
        j = torch.arange(first, k_len, device=q.device)
        back = pos[:, None] - j[None, :]
        window = (back >= 0) & (back % dilation == 0) & (back // dilation < kernel)
        return first, window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        if call.state is not None:
            first, window = self._decode_window(q, k.shape[2], call)
            mask = window[None, None]
            if call.key_mask is not None:
                mask = mask & call.key_mask[:, None, None, first:]
            return softmax_attention(q, k[:, :, first:], v[:, :, first:], mask=mask)
        axes = self._axes(call, q.shape[2])
        spatial = axes.pop("spatial")
        b = q.shape[0]
        out = neighborhood_attention(
            q.reshape(b, q.shape[1], *spatial, -1), k.reshape(b, k.shape[1], *spatial, -1),
            v.reshape(b, v.shape[1], *spatial, -1), **axes, mask=call.key_mask,
            backend=self.backend)
        return out.reshape(q.shape[0], q.shape[1], -1, v.shape[-1])

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        if call.state is not None:
            first, window = self._decode_window(q, k.shape[2], call)
            vis = torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            vis[:, first:] = window
        else:
            axes = self._axes(call, q.shape[2])
            vis = neighborhood_visibility(axes.pop("spatial"), **axes, device=q.device)
        padded = call.op_mask
        return softmax_weights(q, k, mask=vis if padded is None else vis & padded)
