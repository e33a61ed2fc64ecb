"""soft against the official SOFT module (fudan-zvg/SOFT @ d3febc3,
models/softmax_free_transformer.py ``SoftmaxFreeAttention`` with its
``SoftmaxFreeAttentionKernel``, ratio > 1, and SOFT/kernel/inverse.py's Newton inverse).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: ``W_q`` and ``W_v`` (with bias; K = Q), ``attn.Qlandmark_op`` (an r x r
convolution D -> D of stride r, no bias, shared by the heads), ``attn.Qnorm_act.0``
(LayerNorm(D), then GELU), ``attn.conv`` (one k x k kernel per head shared by its channels,
no bias), ``ff`` (with bias). Q' = Q / D^(1/4), kernels exp(-|a - b|^2 / 2), 20 Newton steps
on S(Q~, Q~) + 0.01 I whose backward is the exact inverse's, -V^T G V^T (written here as the
linearisation V - V dA V around the Newton result, not as that code's autograd Function).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnlab as al
from attnlab.mechanisms.soft import NewtonInverse, newton_inverse

from .common import Official, compare_with_official, leaf

OFFICIAL = Official(
    mechanism="soft",
    code="fudan-zvg/SOFT @ d3febc3, models/softmax_free_transformer.py, SoftmaxFreeAttention",
    differences=(
        "one stage's constants: ratio=2, local_kernel=3 (the official third stage; stages "
        "1-2 use ratio 8/4 with kernels 9/5)",
        "projection biases are an option (bias=True; attnlab's common default is no bias)",
        "a grid the ratio does not divide is zero-padded at its bottom/right (official: "
        "the last rows/columns are dropped from the landmarks)",
        "PyTorch's linear init (the official model's trunc-normal std 0.02 is model-level)",
        "key padding accepted (contract): padded tokens are zeroed before both convolutions",
    ),
)

B = 2


def official_params(heads: int, hd: int, ratio: int, kernel: int,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    dim = heads * hd

    def w(*shape, fan):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * fan ** -0.5
    p = {"W_q.weight": w(dim, dim, fan=dim), "W_q.bias": w(dim, fan=4),
         "W_v.weight": w(dim, dim, fan=dim), "W_v.bias": w(dim, fan=4),
         "attn.Qlandmark_op.weight": w(hd, hd, ratio, ratio, fan=hd * ratio * ratio),
         "attn.Qnorm_act.0.weight": 1 + 0.3 * w(hd, fan=1), "attn.Qnorm_act.0.bias": w(hd, fan=9),
         "attn.conv.weight": w(heads, 1, kernel, kernel, fan=kernel * kernel),
         "ff.weight": w(dim, dim, fan=dim), "ff.bias": w(dim, fan=4)}
    return {k: leaf(v) for k, v in p.items()}


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cross = a @ b.transpose(-1, -2)
    return (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2 * cross


def newton(a: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """The official Newton inverse of A + 0.01 I, with the exact inverse's backward."""
    with torch.no_grad():
        p = a + 0.01 * torch.eye(a.shape[-1], dtype=a.dtype)
        alpha = 0.9 * 2 / a.sum(-1).max(-1).values ** 2
        v = alpha[..., None, None] * p
        for _ in range(steps):
            v = 2 * v - v @ p @ v
    return v - v @ (a - a.detach()) @ v  # value V; d/dA: -V^T G V^T


def official_forward(p: dict, x: torch.Tensor, grid: tuple[int, int], heads: int, hd: int,
                     ratio: int, kernel: int) -> torch.Tensor:
    """x (B, h w, C) -> (B, h w, C), one official SoftmaxFreeAttention (ratio > 1)."""
    b, n, _ = x.shape
    q = (x @ p["W_q.weight"].T + p["W_q.bias"]).reshape(b, n, heads, hd).transpose(1, 2)
    v = (x @ p["W_v.weight"].T + p["W_v.bias"]).reshape(b, n, heads, hd).transpose(1, 2)
    q = q / math.sqrt(math.sqrt(hd))
    img = q.reshape(b * heads, *grid, hd).permute(0, 3, 1, 2)
    marks = F.conv2d(img, p["attn.Qlandmark_op.weight"], stride=ratio)
    marks = marks.flatten(2).transpose(1, 2).reshape(b, heads, -1, hd)
    marks = F.gelu(F.layer_norm(marks, (hd,), p["attn.Qnorm_act.0.weight"],
                                p["attn.Qnorm_act.0.bias"]))
    k1 = torch.exp(-sq_dist(q, marks) / 2)
    k2 = torch.exp(-sq_dist(marks, marks) / 2)
    out = (k1 @ newton(k2)) @ (k1.transpose(-1, -2) @ v)
    vimg = v.reshape(b, heads, *grid, hd).permute(0, 4, 1, 2, 3).reshape(b * hd, heads, *grid)
    conv = F.conv2d(vimg, p["attn.conv.weight"], padding=kernel // 2, groups=heads)
    out = out + conv.reshape(b, hd, heads, n).permute(0, 2, 3, 1)
    out = out.transpose(1, 2).reshape(b, n, heads * hd)
    return out @ p["ff.weight"].T + p["ff.bias"]


NAMES = {"qkv.qk.weight": "W_q.weight", "qkv.qk.bias": "W_q.bias",
         "qkv.v.weight": "W_v.weight", "qkv.v.bias": "W_v.bias",
         "landmark_op.conv.weight": "attn.Qlandmark_op.weight",
         "landmark_op.norm.weight": "attn.Qnorm_act.0.weight",
         "landmark_op.norm.bias": "attn.Qnorm_act.0.bias",
         "local.conv.weight": "attn.conv.weight", "o_proj.weight": "ff.weight",
         "o_proj.bias": "ff.bias"}


@pytest.mark.parametrize("heads,hd,grid,ratio,kernel", [
    (2, 8, (4, 4), 2, 3),   # the defaults (the official third stage)
    (1, 8, (6, 6), 3, 5),
    (4, 4, (8, 4), 4, 9),   # stage-1-like: ratio 4 here for a small grid, kernel 9
    (2, 6, (3, 5), 1, 3),   # as many landmarks as tokens (a 1 x 1 conv, the official Linear)
])
def test_soft_equals_the_official_module(heads, hd, grid, ratio, kernel):
    gen = torch.Generator().manual_seed(100 + ratio + kernel)
    p = official_params(heads, hd, ratio, kernel, gen)
    n = grid[0] * grid[1]
    x = torch.randn(B, n, heads * hd, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, n, heads * hd, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, grid, heads, hd, ratio, kernel)
    (y_off * weight).sum().backward()

    attn = al.build("soft", dim=heads * hd, heads=heads, ratio=ratio, local_kernel=kernel,
                    bias=True).double()
    xa = x.reshape(B, *grid, heads * hd)
    compare_with_official(attn, p, NAMES, xa, weight.reshape(xa.shape),
                          y_off.reshape(xa.shape), _Reshaped(xo, xa.shape))


class _Reshaped:
    """The official input's gradient in the attnlab input's (B, h, w, C) layout."""

    def __init__(self, t: torch.Tensor, shape: torch.Size) -> None:
        self.grad = t.grad.reshape(shape)


def test_soft_defaults_are_the_official_third_stage():
    attn = al.build("soft", dim=64, heads=4)
    assert (attn.landmark, attn.ratio, attn.inverse, attn.iterations, attn.newton_grad) == \
        ("conv", 2, "newton", 20, "inverse")
    assert attn.landmark_op.conv.weight.shape == (16, 16, 2, 2)
    assert attn.landmark_op.conv.bias is None and attn.local.conv.bias is None
    assert attn.local.conv.weight.shape == (4, 1, 3, 3)  # one 3 x 3 kernel per head
    # PyTorch's conv init, as the official (its model re-initialises only Linear and
    # LayerNorm): uniform within 1 / sqrt(fan_in)
    assert attn.landmark_op.conv.weight.abs().max() <= 64 ** -0.5
    assert attn.local.conv.weight.abs().max() <= 1 / 3
    norm = attn.landmark_op.norm
    assert (norm.weight == 1).all() and (norm.bias == 0).all() and norm.eps == 1e-5


def test_soft_newton_backward_is_the_exact_inverse_rule():
    """The default backward equals -V^T G V^T; unrolled differentiates through the steps."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 49, 4, generator=gen, dtype=torch.float64) * 0.5  # ill-conditioned:
    a = torch.exp(-sq_dist(x, x) / 2)  # 20 steps have not converged, so the two rules differ
    g = torch.randn(1, 1, 49, 49, generator=gen, dtype=torch.float64)
    a1, a2 = leaf(a), leaf(a)
    (NewtonInverse.apply(a1, 20) * g).sum().backward()
    (newton(a2) * g).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-12, atol=1e-12)
    a3 = leaf(a)
    (newton_inverse(a3, 20) * g).sum().backward()
    assert (a3.grad - a1.grad).abs().max() > 0.1 * a1.grad.abs().max()


def test_soft_dwconv_is_a_deprecated_alias_of_local():
    with pytest.warns(FutureWarning, match="local"):
        attn = al.build("soft", dim=32, heads=2, dwconv=False)
    assert attn.local is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        al.build("soft", dim=32, heads=2, local=False)
    with pytest.raises(ValueError, match="dwconv"):
        al.build("soft", dim=32, heads=2, dwconv="no")
