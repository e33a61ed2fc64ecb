"""SOFT: softmax-free attention with a Gaussian kernel and Nystrom landmarks."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from attnlab.core.arguments import SQUARE, Arg, is_square
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import SharedQKProjection
from attnlab.modules.spatial import DepthwiseConv, grid_of, masked_pool
from attnlab.ops.common import upcast

INVERSES = ("newton", "exact")


def gaussian_kernel(a: Tensor, b: Tensor) -> Tensor:
    """S(a, b) = exp(-|a - b|^2 / (2 sqrt(d))), (.., n, d) x (.., m, d) -> (.., n, m)."""
    d = a.shape[-1]
    sq = (a * a).sum(-1, keepdim=True) - 2 * a @ b.transpose(-1, -2) + (b * b).sum(-1)[..., None, :]
    return torch.exp(-sq.clamp_min(0.0) / (2 * math.sqrt(d)))


def newton_inverse(a: Tensor, iterations: int = 20, reg: float = 0.01) -> Tensor:
    """Newton-Raphson inverse of P = A + reg I: V0 = alpha P, alpha = 0.9 * 2 / max_rowsum(A)^2,
    V <- 2V - V P V (SOFT's iteration; converges for symmetric positive A)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    p = a + reg * eye
    alpha = 0.9 * 2 / a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1) ** 2
    v = alpha * p
    for _ in range(iterations):
        v = 2 * v - v @ p @ v
    return v


@register("soft", family="linear", paper="Softmax-free Linear Transformers",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n m d", weights=True, cross=False, weights_exact=False,
          unsupported=("kv_heads",),
          variants=({"dwconv": False, "normalize": True}, {"ratio": 1, "inverse": "exact"}))
class SoftAttention(Attention):
    """SOFT: a Gaussian-kernel attention approximated through m landmarks (Nystrom).

    "Softmax-free Linear Transformers" (fudan-zvg/SOFT). K = Q (shared projection),
    S(a, b) = exp(-|a - b|^2 / (2 sqrt(d))), landmarks Q~ = average pooling of Q with stride
    ``ratio`` on the token grid (over real tokens; the paper also offers a strided conv),

        O = S(Q, Q~) pinv(S(Q~, Q~)) S(Q~, Q) V + DWConv(V),

    pinv by 20 Newton-Raphson steps on S(Q~, Q~) + 0.01 I (``inverse="exact"``:
    torch.linalg.pinv). Landmarks: a fixed number (``landmarks=49``: 7 x 7 on an image, as
    the paper's per-stage ratios give at every stage; 49 on a sequence), so the cost stays
    O(n m d + m^3), linear in n; ``ratio=r`` pools with stride r per axis instead (m grows
    with n: m^3 dominates for long inputs). ``normalize=True``: the symmetric-normalised variant
    D^-1/2 A D^-1/2 with D the row sums of the approximation. With as many landmarks as
    tokens (``ratio=1``) and the exact inverse it equals S(Q, Q) V.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "landmarks": Arg("int", low=1, rule=SQUARE, test=is_square),
        "ratio": Arg("int", optional=True, low=1),
        "inverse": Arg("str", choices=INVERSES),
        "newton_iterations": Arg("int", low=0),
        "normalize": Arg("bool"),
        "dwconv": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, landmarks: int = 49, ratio: int | None = None,
                 inverse: str = "newton", newton_iterations: int = 20, normalize: bool = False,
                 dwconv: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, projection=SharedQKProjection, **kwargs)
        self.landmarks = landmarks
        self.ratio, self.inverse, self.iterations = ratio, inverse, newton_iterations
        self.normalize = normalize
        self.dwconv = DepthwiseConv(self.heads * self.head_dim, 3) if dwconv else None
        self.weights_reproduce_output = not dwconv

    def _cells(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The landmark grid: ``ratio`` pools with that stride per axis; otherwise a fixed
        number of landmarks (7 x 7 on an image, 49 on a sequence), never more than tokens."""
        if self.ratio is not None:
            return tuple(max(1, -(-g // self.ratio)) for g in grid)
        side = math.isqrt(self.landmarks)
        if grid[0] == 1:
            return 1, min(grid[1], self.landmarks)
        return min(grid[0], side), min(grid[1], side)

    def _factors(self, q: Tensor, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        """S(Q, Q~), pinv(S(Q~, Q~)), S(Q~, Q) with padded keys' columns zeroed."""
        grid = grid_of(q.shape[2], call.spatial)
        cells = self._cells(grid)
        q = upcast(q)[0]  # kernel and inverse in float32 at least (pinv has no bf16)
        landmarks = masked_pool(q, call.key_mask, grid, cells)
        left = gaussian_kernel(q, landmarks)
        core = gaussian_kernel(landmarks, landmarks)
        right = gaussian_kernel(landmarks, q)
        if call.key_mask is not None:  # masked_fill: a padded key's kernel may be NaN
            right = right.masked_fill(~call.key_mask[:, None, None, :], 0)
        inv = (torch.linalg.pinv(core) if self.inverse == "exact"
               else newton_inverse(core, self.iterations))
        return left, inv, right

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        # Under autocast the Newton-Schulz steps and the products through the inverse would
        # run in bf16/fp16, where the inverse errs by ~10%: they stay in float32.
        with torch.autocast(q.device.type, enabled=False):
            left, inv, right = self._factors(q, call)
            dtype, v = v.dtype, self.expand_kv(v).to(left.dtype)
            mixed = inv @ right  # (m, n): shared with weights(), so both round alike
            if not self.normalize:
                return (left @ (mixed @ v)).to(dtype)
            ones = v.new_ones(*v.shape[:-1], 1)
            d = (left @ (mixed @ ones)).clamp_min(1e-6).rsqrt()  # D^-1/2, (B, H, n, 1)
            d_keys = d  # on the keys' side a padded key's factor is 0 (its row may be NaN)
            if call.key_mask is not None:
                d_keys = d.masked_fill(~call.key_mask[:, None, :, None], 0)
            return (d * (left @ (mixed @ (d_keys * v)))).to(dtype)

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            left, inv, right = self._factors(q, call)
            a = left @ (inv @ right)
            if not self.normalize:
                return a
            d = a.sum(-1, keepdim=True).clamp_min(1e-6).rsqrt()
            return d * a * d.transpose(-1, -2)

    def local_term(self, v: Tensor, call: Call) -> Tensor | None:
        if self.dwconv is None:
            return None
        out = self.dwconv(v.transpose(1, 2).flatten(2), grid_of(v.shape[2], call.spatial),
                          call.key_mask)
        return self.split_heads(out, self.heads)
