"""Input projections: the part of a mechanism that turns its input into q, k and v.

Each is an ``nn.Module`` built from a :class:`~attnlab.core.call.HeadShape` and called with
the forward call's :class:`~attnlab.core.call.Call`; it returns q ``(B, H, L, Dqk)``, k
``(B, H_kv, Lk, Dqk)`` and v ``(B, H_kv, Lk, D)``. A mechanism picks one through
``Attention.__init__(..., projection=...)`` (a class or a ``functools.partial`` of one).
"""

from __future__ import annotations

from torch import Tensor, nn

from attnlab.core.call import Call, HeadShape
from attnlab.modules.causal_conv import CausalConv1d


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, L, heads * D) -> (B, heads, L, D)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


class QKVProjection(nn.Module):
    """Plain q, k, v: three linear maps; k and v from the context under cross-attention.

    ``channels``: project only the first ``channels`` input channels (SHViT's partial
    attention); all of them by default.
    """

    def __init__(self, shape: HeadShape, *, channels: int | None = None) -> None:
        super().__init__()
        self.shape, self.channels = shape, channels
        width = shape.dim if channels is None else channels
        self.q = nn.Linear(width, shape.heads * shape.qk_dim, bias=shape.bias)
        self.k = nn.Linear(width, shape.kv_heads * shape.qk_dim, bias=shape.bias)
        self.v = nn.Linear(width, shape.kv_heads * shape.head_dim, bias=shape.bias)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, src = call.x, call.source
        if self.channels is not None:
            x, src = x[..., :self.channels], src[..., :self.channels]
        s = self.shape
        return (split_heads(self.q(x), s.heads), split_heads(self.k(src), s.kv_heads),
                split_heads(self.v(src), s.kv_heads))


class SharedQKProjection(nn.Module):
    """Keys are the queries (K = Q, one linear map ``qk``), values their own (SOFT)."""

    shared_qk = True  # the base then shares the qk-norm between q and k as well

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape
        self.qk = nn.Linear(shape.dim, shape.heads * shape.qk_dim, bias=shape.bias)
        self.v = nn.Linear(shape.dim, shape.kv_heads * shape.head_dim, bias=shape.bias)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        q = split_heads(self.qk(call.x), self.shape.heads)
        return q, q, split_heads(self.v(call.x), self.shape.kv_heads)


class ValueProjection(nn.Module):
    """Values only, for mechanisms that mix values without queries or keys (spectral
    gating, Gaussian adaptive attention): q and k are empty ``(B, H, L, 0)`` tensors."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape
        self.v = nn.Linear(shape.dim, shape.kv_heads * shape.head_dim, bias=shape.bias)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        empty = empty_like_heads(call.x, self.shape.heads)
        return empty, empty, split_heads(self.v(call.x), self.shape.kv_heads)


class ConvolvedQKVProjection(QKVProjection):
    """q, k, v each through a linear map and a causal depthwise convolution over time
    (kernel ``kernel``); the convolutions' last inputs travel in the decoding state."""

    def __init__(self, shape: HeadShape, *, kernel: int = 3) -> None:
        super().__init__(shape)
        self.conv_q = _depthwise(shape.heads * shape.qk_dim, kernel)
        self.conv_k = _depthwise(shape.kv_heads * shape.qk_dim, kernel)
        self.conv_v = _depthwise(shape.kv_heads * shape.head_dim, kernel)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, keep, state = call.x, call.key_mask, call.state
        out, history = [], {}
        for name, proj, conv, heads in (("q", self.q, self.conv_q, self.shape.heads),
                                        ("k", self.k, self.conv_k, self.shape.kv_heads),
                                        ("v", self.v, self.conv_v, self.shape.kv_heads)):
            past = state.get(f"conv_{name}") if state is not None else None
            y, history[f"conv_{name}"] = conv(proj(x), keep, past)
            out.append(split_heads(y, heads))
        if state is not None:
            state.put(**history)
        return out[0], out[1], out[2]


def _depthwise(channels: int, kernel: int) -> CausalConv1d:
    return CausalConv1d(channels, kernel, groups=channels)


def empty_like_heads(x: Tensor, heads: int) -> Tensor:
    """A (B, heads, L, 0) tensor: the q or k of a mechanism that has none."""
    return x.new_zeros(x.shape[0], heads, x.shape[1], 0)
