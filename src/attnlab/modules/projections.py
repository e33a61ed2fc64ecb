"""Input projections: the part of a mechanism that turns its input into q, k and v.

Each is an ``nn.Module`` built from a :class:`~attnlab.core.call.HeadShape` and called with
the forward call's :class:`~attnlab.core.call.Call`; it returns q ``(B, H, L, Dqk)``, k
``(B, H_kv, Lk, Dqk)`` and v ``(B, H_kv, Lk, D)``. A mechanism picks one through
``Attention.__init__(..., projection=...)`` (a class or a ``functools.partial`` of one).
"""

from __future__ import annotations

from torch import Tensor, nn

from attnlab.core.call import Call, HeadShape


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, L, heads * D) -> (B, heads, L, D)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


class QKVProjection(nn.Module):
    """Plain q, k, v: three linear maps; k and v from the context under cross-attention."""

    def __init__(self, shape: HeadShape) -> None:
        super().__init__()
        self.shape = shape
        self.q = nn.Linear(shape.dim, shape.heads * shape.qk_dim, bias=shape.bias)
        self.k = nn.Linear(shape.dim, shape.kv_heads * shape.qk_dim, bias=shape.bias)
        self.v = nn.Linear(shape.dim, shape.kv_heads * shape.head_dim, bias=shape.bias)

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        x, src = call.x, call.source
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


def empty_like_heads(x: Tensor, heads: int) -> Tensor:
    """A (B, heads, L, 0) tensor: the q or k of a mechanism that has none."""
    return x.new_zeros(x.shape[0], heads, x.shape[1], 0)
