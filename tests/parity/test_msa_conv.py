"""msa_conv against the official MSA-Conv module (StriveZs/MSA-Conv @ 2d96f54,
core/op/Transformer_in_Convolution.py ``MSA_Conv_2d``, whose ops ``MSA_Conv2d_v1`` (q.k over the
window) and ``MSA_Conv2d_1_v1`` (weights x v) are the CUDA/C++ extension of core/op/msa_conv.cpp
and msa_conv_cuda.cu, re-expressed here).

The official computation is re-expressed in float64 from reading that code, in its own
parameter layout: ``qkv_conv`` (a 1x1 convolution C -> 3C with a bias), chunked into q, k, v;
the op's im2col takes, for each of the kh x kw window positions (row-major), the key at
(h - p_h + i d, w - p_w + j d), p = d (k - 1) // 2, and 0 where that falls off the image;
scores q.k times C^-1/2, softmax over the window positions (dim 1), the weights times the
values gathered the same way; then the module's own stage: ``out + x``, ``mlp`` (a k x k
convolution C -> C_out, no bias) and ReLU. The attnlab module (heads=1,
its o_proj an identity) computes the attention output; the test applies that last stage
with the official ``mlp`` weight to it (attnlab leaves it to the backbone, see the
differences). The official extension casts q, k, v to float32; here everything is float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="msa_conv",
    code="StriveZs/MSA-Conv @ 2d96f54, core/op/Transformer_in_Convolution.py, MSA_Conv_2d "
         "(its CUDA op re-expressed)",
    differences=(
        "the official residual, k x k 'mlp' convolution and ReLU after the attention are "
        "left to the backbone (the convolution TiC keeps); attnlab ends with its linear "
        "output projection (o_proj an identity, then that stage: equal)",
        "heads is the caller's: the official is one head of width C (heads=1)",
        "attention dropout 0.1 on the weights in training (attnlab: dropout, default 0, "
        "on the output); q, k, v cast to float32 by the official extension",
        "key padding (contract): padded tokens are no keys, not zero-padded ones",
    ),
)

B, C = 2, 6


def official_params(kernel: tuple[int, int], gen: torch.Generator) -> dict[str, Tensor]:
    p = {"qkv_conv.weight": torch.randn(3 * C, C, 1, 1, generator=gen, dtype=torch.float64),
         "qkv_conv.bias": torch.randn(3 * C, generator=gen, dtype=torch.float64),
         "mlp.weight": torch.randn(C, C, *kernel, generator=gen, dtype=torch.float64)}
    p["qkv_conv.weight"] = p["qkv_conv.weight"] * C ** -0.5
    p["mlp.weight"] = p["mlp.weight"] * (C * kernel[0] * kernel[1]) ** -0.5
    return {k: leaf(v) for k, v in p.items()}


def window_columns(t: Tensor, kernel: tuple[int, int], dilation: int) -> list[Tensor]:
    """The op's im2col: for each window position (i, j), row-major, the (B, C, H, W) tensor
    of t at (h - p_h + i d, w - p_w + j d), zero off the image."""
    (kh, kw), d = kernel, dilation
    ph, pw = d * (kh - 1) // 2, d * (kw - 1) // 2
    h, w = t.shape[-2:]
    # enough zeros on every side for each position, as the kernel's bounds check gives
    padded = F.pad(t, (pw, d * (kw - 1) - pw, ph, d * (kh - 1) - ph))
    return [padded[..., i * d:i * d + h, j * d:j * d + w] for i in range(kh)
            for j in range(kw)]


def official_attention(p: dict[str, Tensor], x: Tensor, kernel: tuple[int, int],
                       dilation: int, key_mask: Tensor | None = None) -> Tensor:
    """MSA_Conv_2d up to ``out`` (before ``out += x``) on (B, C, H, W). ``key_mask`` (B, H, W)
    is no part of the official module: padded tokens are then left out of the softmax (the
    attnlab contract), the zero-padded positions still count."""
    qkv = F.conv2d(x, p["qkv_conv.weight"], p["qkv_conv.bias"])
    q, k, v = qkv.chunk(3, dim=1)
    keys = window_columns(k, kernel, dilation)
    dots = torch.stack([(q * kk).sum(1) for kk in keys], 1) * C ** -0.5  # (B, kh kw, H, W)
    if key_mask is not None:
        pad = window_columns(key_mask[:, None].double(), kernel, dilation)
        off_image = window_columns(torch.ones_like(key_mask[:, None]).double(), kernel,
                                   dilation)
        padded = torch.stack([(pm == 0) & (oi == 1) for pm, oi in zip(pad, off_image,
                                                                        strict=True)], 1)
        dots = dots.masked_fill(padded[:, :, 0], float("-inf"))
    attn = torch.softmax(dots, dim=1)
    values = window_columns(v, kernel, dilation)
    return sum(attn[:, i:i + 1] * vv for i, vv in enumerate(values))


def official_stage(p: dict[str, Tensor], out: Tensor, x: Tensor,
                   kernel: tuple[int, int]) -> Tensor:
    """The rest of MSA_Conv_2d.forward: residual, the k x k 'mlp' convolution (stride 1,
    padding (k - 1) // 2 given to the constructor, no bias), ReLU."""
    pad = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    return torch.relu(F.conv2d(out + x, p["mlp.weight"], padding=pad))


def weight_map() -> dict[str, tuple[str, slice]]:
    names = {}
    for i, mine in enumerate("qkv"):
        rows = slice(i * C, (i + 1) * C)
        names[f"qkv.{mine}.weight"] = ("qkv_conv.weight", rows)
        names[f"qkv.{mine}.bias"] = ("qkv_conv.bias", rows)
    return names


def mapped(t: Tensor, rows: slice) -> Tensor:
    t = t[rows]
    return t[..., 0, 0] if t.dim() == 4 else t


CASES = {  # name: (image (H, W), attnlab kernel_size, official kernel, dilation, padding)
    "3x3": ((5, 6), 3, (3, 3), 1, False),
    "5x5_dilation_2": ((6, 7), 5, (5, 5), 2, False),
    "3x3_dilation_2_padding": ((5, 6), 3, (3, 3), 2, True),
    "5x1_dilation_2": ((7, 5), (5, 1), (5, 1), 2, False),  # the authors' validation.py
    "even_4x2": ((5, 6), (4, 2), (4, 2), 1, False),
    "sequence_k3": ((1, 9), 3, (1, 3), 1, True),  # a sequence: an image one row high
}


def odd(kernel: tuple[int, int]) -> bool:
    return kernel[0] % 2 == 1 and kernel[1] % 2 == 1


@pytest.mark.parametrize("case", list(CASES))
def test_msa_conv_equals_the_official_module(case):
    (h, w), kernel_size, kernel, dilation, padded = CASES[case]
    sequence = case.startswith("sequence")
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    p = official_params(kernel, gen)
    x = torch.randn(B, C, h, w, generator=gen, dtype=torch.float64)  # official layout
    weight = torch.randn(B, C, h, w, generator=gen, dtype=torch.float64)
    key_mask = None
    if padded:
        key_mask = torch.ones(B, h, w, dtype=torch.bool)
        key_mask[0, -1, -2:] = False
        key_mask[1, 0, 1] = False
        weight = weight * key_mask[:, None]  # padded rows are no output of the contract
    stage = odd(kernel)  # the 'mlp' convolution keeps the size for odd kernels only

    real = 1.0 if key_mask is None else key_mask[:, None].double()
    xo = leaf(x)
    # padded tokens' rows are those of zero tokens in attnlab (contract) and of their content
    # in the official module: neither is an output, so the stage reads them as 0 in both
    y_off = official_attention(p, xo, kernel, dilation, key_mask) * real
    if stage:
        y_off = official_stage(p, y_off, xo, kernel)
    (y_off * weight).sum().backward()

    attn = al.build("msa_conv", dim=C, heads=1, kernel_size=kernel_size,
                    dilation=dilation).double()
    attn.o_proj = nn.Identity()  # the official output stage follows instead
    names = weight_map()
    own = dict(attn.named_parameters())
    assert set(own) == set(names), "every attnlab parameter mapped"
    with torch.no_grad():
        for mine, t in own.items():
            t.copy_(mapped(p[names[mine][0]], names[mine][1]))
    mlp = leaf(p["mlp.weight"])
    xa = leaf(x)
    tokens = xa.permute(0, 2, 3, 1)  # (B, H, W, C)
    mask = key_mask
    if sequence:
        tokens, mask = tokens[:, 0], None if key_mask is None else key_mask[:, 0]
    y = attn(tokens, mask=mask)
    y = (y[:, None] if sequence else y).permute(0, 3, 1, 2) * real
    if stage:
        y = official_stage({"mlp.weight": mlp}, y, xa, kernel)
    (y * weight).sum().backward()

    pairs = {"out": (y * real, y_off * real), "grad x": (xa.grad, xo.grad)}
    for mine, t in own.items():
        theirs, rows = names[mine]
        pairs[f"grad {mine}"] = (t.grad, mapped(p[theirs].grad, rows))
    if stage:
        pairs["grad mlp.weight"] = (mlp.grad, p["mlp.weight"].grad)
    assert_parity(pairs)


def test_msa_conv_defaults_are_the_official_ones():
    attn = al.build("msa_conv", dim=C, heads=1)
    assert attn.border == "zeros" and attn.kernel_size == 3 and attn.dilation == 1
    # the official qkv_conv has a bias (nn.Conv2d's default) while the module's bias=False
    for part in (attn.qkv.q, attn.qkv.k, attn.qkv.v):
        assert part.bias is not None
    assert attn.o_proj.bias is None
    # nn.Linear's init is nn.Conv2d's (1x1): U(+-fan_in^-1/2) for the weight and the bias
    big = al.build("msa_conv", dim=256, heads=1)
    bound = 256 ** -0.5
    assert big.qkv.q.weight.abs().max() <= bound and big.qkv.q.bias.abs().max() <= bound
    assert abs(big.qkv.q.weight.std().item() - bound / 3 ** 0.5) < 2e-3
    # off-image positions take weight (rows of a corner sum below 1, inside rows to 1)
    w = attn.weights(torch.randn(1, 3, 4, C))
    assert w[0, 0, 0].sum() < 1 and torch.isclose(w[0, 0, 5].sum(), torch.tensor(1.0))
    clip = al.build("msa_conv", dim=C, heads=1, border="clip")  # the earlier rule
    assert torch.allclose(clip.weights(torch.randn(1, 3, 4, C)).sum(-1), torch.ones(1, 1, 12))
