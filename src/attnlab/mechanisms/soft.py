"""SOFT: softmax-free attention with a Gaussian kernel and Nystrom landmarks."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from attnlab.core.arguments import SQUARE, Arg, deprecated_alias, is_square
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import SharedQKProjection
from attnlab.modules.spatial import grid_of, masked_pool
from attnlab.ops.common import upcast

INVERSES = ("newton", "exact")
LANDMARK_OPS = ("conv", "pool")
NEWTON_GRADS = ("inverse", "unrolled")


def unit_gaussian(a: Tensor, b: Tensor) -> Tensor:
    """exp(-|a - b|^2 / 2), (.., n, d) x (.., m, d) -> (.., n, m)."""
    sq = (a * a).sum(-1, keepdim=True) - 2 * a @ b.transpose(-1, -2) + (b * b).sum(-1)[..., None, :]
    return torch.exp(-sq.clamp_min(0.0) / 2)


def gaussian_kernel(a: Tensor, b: Tensor) -> Tensor:
    """S(a, b) = exp(-|a - b|^2 / (2 sqrt(d))), (.., n, d) x (.., m, d) -> (.., n, m)."""
    s = a.shape[-1] ** -0.25
    return unit_gaussian(a * s, b * s)


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


class NewtonInverse(torch.autograd.Function):
    """V = newton_inverse(A) forward; backward as if V were the exact inverse of A + 0.01 I,
    dL/dA = -V^T (dL/dV) V^T (SOFT's rule: two m x m products instead of differentiating
    through every Newton step)."""

    @staticmethod
    def forward(ctx, a: Tensor, iterations: int) -> Tensor:
        with torch.no_grad():
            v = newton_inverse(a, iterations)
        ctx.save_for_backward(v)
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (v,) = ctx.saved_tensors
        vt = v.transpose(-1, -2)
        return -(vt @ grad @ vt), None


class ConvLandmarks(nn.Module):
    """SOFT's landmarks: a ``ratio`` x ``ratio`` convolution with stride ``ratio`` (D -> D, no
    bias, shared by the heads) on each head's token grid, then LayerNorm(D) and GELU. A grid
    that ``ratio`` does not divide is zero-padded at its bottom and right (the official drops
    those rows and columns); padded tokens are zeroed first."""

    def __init__(self, head_dim: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.conv = nn.Conv2d(head_dim, head_dim, ratio, stride=ratio, bias=False)
        self.norm = nn.LayerNorm(head_dim)

    def forward(self, q: Tensor, grid: tuple[int, int], keep: Tensor | None) -> Tensor:
        """q (B, H, L, D) -> landmarks (B, H, M, D)."""
        b, h, _, d = q.shape
        if keep is not None:  # (not q * keep: inf x 0 is NaN)
            q = q.masked_fill(~keep[:, None, :, None], 0)
        img = q.reshape(b * h, *grid, d).permute(0, 3, 1, 2)
        r = self.ratio
        img = F.pad(img, (0, -grid[1] % r, 0, -grid[0] % r))
        out = F.conv2d(img, self.conv.weight.to(img.dtype), stride=r)
        out = out.flatten(2).transpose(1, 2).reshape(b, h, -1, d)
        norm = self.norm
        out = F.layer_norm(out, (d,), norm.weight.to(out.dtype), norm.bias.to(out.dtype), norm.eps)
        return F.gelu(out)


class HeadConv(nn.Module):
    """SOFT's local term: one k x k kernel per head, shared by the head's channels, no bias,
    on V's token grid (a sequence is a 1 x L grid: the kernel's middle row); padded tokens
    are zeroed first."""

    def __init__(self, heads: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(heads, heads, kernel, padding=kernel // 2, groups=heads,
                              bias=False)

    def forward(self, v: Tensor, grid: tuple[int, int], keep: Tensor | None) -> Tensor:
        """v (B, H, L, D) -> (B, H, L, D)."""
        b, h, n, d = v.shape
        if keep is not None:
            v = v.masked_fill(~keep[:, None, :, None], 0)
        img = v.permute(0, 3, 1, 2).reshape(b * d, h, *grid)
        return self.conv(img).reshape(b, d, h, n).permute(0, 2, 3, 1)


@register("soft", family="linear", paper="Softmax-free Linear Transformers",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n m d", weights=True, cross=False, weights_exact=False,
          unsupported=("kv_heads",),
          variants=({"local": False, "normalize": True},
                    {"landmark": "pool", "ratio": 1, "inverse": "exact"},
                    {"landmark": "pool", "landmarks": 49, "newton_grad": "unrolled"}))
class SoftAttention(Attention):
    """SOFT: a Gaussian-kernel attention approximated through m landmarks (Nystrom).

    "Softmax-free Linear Transformers" (official code fudan-zvg/SOFT,
    ``SoftmaxFreeAttentionKernel``). K = Q (shared projection), Q' = Q / d^(1/4),
    S(a, b) = exp(-|a - b|^2 / 2), landmarks Q~ = GELU(LayerNorm(Conv_r(Q'))) with Conv_r an
    r x r convolution of stride r = ``ratio`` on each head's token grid,

        O = S(Q', Q~) pinv(S(Q~, Q~)) S(Q~, Q') V + DWConv_k(V),

    DWConv_k one k x k kernel per head (``local_kernel``), shared by its channels, no bias.
    pinv: 20 Newton-Raphson steps on S(Q~, Q~) + 0.01 I, differentiated as the exact inverse
    (``newton_grad="unrolled"``: through the steps); ``inverse="exact"``: torch.linalg.pinv.
    Defaults r = 2, k = 3: the official third stage (the one with most blocks; 14 x 14 tokens
    give 7 x 7 landmarks); m = n / r^2 grows with n. ``landmark="pool"``: average pooling
    instead of the convolution (no LayerNorm, GELU), with stride ``ratio`` or a fixed number
    ``landmarks`` (7 x 7 on an image, 49 on a sequence: cost linear in n). ``normalize=True``:
    attnlab's symmetric-normalised variant D^-1/2 A D^-1/2, D the row sums of the
    approximation. ``local=False`` drops DWConv (``dwconv=``: its deprecated name).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "landmark": Arg("str", choices=LANDMARK_OPS),
        "ratio": Arg("int", optional=True, low=1),
        "landmarks": Arg("int", optional=True, low=1, rule=SQUARE, test=is_square),
        "inverse": Arg("str", choices=INVERSES),
        "newton_iterations": Arg("int", low=0),
        "newton_grad": Arg("str", choices=NEWTON_GRADS),
        "normalize": Arg("bool"),
        "local": Arg("bool"),
        "local_kernel": Arg("int", low=1, rule="an odd number", test=lambda k: k % 2 == 1),
        "dwconv": Arg("bool", optional=True),
    }

    def __init__(self, dim: int, heads: int, *, landmark: str = "conv", ratio: int | None = 2,
                 landmarks: int | None = None, inverse: str = "newton",
                 newton_iterations: int = 20, newton_grad: str = "inverse",
                 normalize: bool = False, local: bool = True, local_kernel: int = 3,
                 dwconv: bool | None = None, **kwargs) -> None:
        super().__init__(dim, heads, projection=SharedQKProjection, **kwargs)
        local = deprecated_alias("soft", "dwconv", dwconv, "local", local, True)
        _check_landmarks(landmark, ratio, landmarks)
        self.landmark, self.ratio, self.landmarks = landmark, ratio, landmarks
        self.inverse, self.iterations, self.newton_grad = inverse, newton_iterations, newton_grad
        self.normalize = normalize
        self.landmark_op = (ConvLandmarks(self.head_dim, cast(int, ratio))  # ratio: checked
                            if landmark == "conv" else None)
        self.local = HeadConv(self.heads, local_kernel) if local else None
        self.weights_reproduce_output = not local

    def _cells(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The landmark grid: ``ratio`` cells per axis (rounded up); otherwise a fixed
        number of landmarks (7 x 7 on an image, 49 on a sequence), never more than tokens."""
        if self.landmarks is None:
            assert self.ratio is not None  # _check_landmarks: ratio or landmarks
            return cast("tuple[int, int]", tuple(max(1, -(-g // self.ratio)) for g in grid))
        side = math.isqrt(self.landmarks)
        if grid[0] == 1:
            return 1, min(grid[1], self.landmarks)
        return min(grid[0], side), min(grid[1], side)

    def _landmarks(self, q: Tensor, call: Call, grid: tuple[int, int]) -> Tensor:
        if self.landmark_op is not None:
            return self.landmark_op(q, grid, call.key_mask)
        return masked_pool(q, call.key_mask, grid, self._cells(grid))

    def _inverse(self, core: Tensor) -> Tensor:
        if self.inverse == "exact":
            return torch.linalg.pinv(core)
        if self.newton_grad == "unrolled":
            return newton_inverse(core, self.iterations)
        return NewtonInverse.apply(core, self.iterations)

    def _factors(self, q: Tensor, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        """S(Q', Q~), pinv(S(Q~, Q~)), S(Q~, Q') with padded keys' columns zeroed."""
        grid = grid_of(q.shape[2], call.spatial)
        q = upcast(q)[0] * q.shape[-1] ** -0.25  # float32 at least (pinv has no bf16)
        landmarks = self._landmarks(q, call, grid)
        left = unit_gaussian(q, landmarks)
        core = unit_gaussian(landmarks, landmarks)
        right = left.transpose(-1, -2)
        if call.key_mask is not None:  # masked_fill: a padded key's kernel may be NaN
            right = right.masked_fill(~call.key_mask[:, None, None, :], 0)
        return left, self._inverse(core), right

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
        if self.local is None:
            return None
        return self.local(v, grid_of(v.shape[2], call.spatial), call.key_mask)


def _check_landmarks(landmark: str, ratio: int | None, landmarks: int | None) -> None:
    """conv landmarks need a ratio (the kernel); a fixed number of landmarks is pooling."""
    if landmarks is not None and landmark == "conv":
        raise ValueError("soft: a fixed number of landmarks (landmarks=) needs "
                         "landmark='pool' (the convolution's kernel and stride are ratio)")
    if landmarks is None and ratio is None:
        raise ValueError("soft: give ratio= (landmarks from ratio x ratio cells) or, with "
                         "landmark='pool', landmarks= (a fixed number)")
