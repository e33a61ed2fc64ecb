"""spectral against the official SpectFormer spectral layer (badripatro/SpectFormers @ b6cf487,
vanilla_architecture/spectformer.py ``SpectralGatingNetwork``; the hierarchical model's class of
the same name computes the same with its own filter sizes).

The official computation is re-expressed here in float64 from reading that code, in its own
parameter layout: one ``complex_weight`` (h, w, C, 2) (real and imaginary parts last), the
tokens (B, N, C) laid on an (a, b) grid, an orthonormal rfft2 over the grid, a product with the
complex filter and an orthonormal irfft2 back to (a, b); no projection before or after.
"""

from __future__ import annotations

import pytest
import torch

import attnlab as al

from .common import Official, assert_parity, leaf

OFFICIAL = Official(
    mechanism="spectral",
    code="badripatro/SpectFormers @ b6cf487, vanilla_architecture/spectformer.py, "
         "SpectralGatingNetwork",
    differences=(
        "computes in the input's precision, at least float32 (the official casts every input "
        "to float32 and returns float32: deliberate, float64 stays float64)",
        "a (B, L, C) input is a 1 x L grid unless spatial= is given (the official takes the "
        "square sqrt(N) x sqrt(N) grid: contract, one rule for sequences)",
    ),
)

B = 2


def official_params(grid: tuple[int, int], channels: int, gen: torch.Generator) -> dict:
    h, w = grid[0], grid[1] // 2 + 1
    weight = torch.randn(h, w, channels, 2, generator=gen, dtype=torch.float64)
    return {"complex_weight": leaf(weight)}


def official_forward(p: dict, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens of an (a, b) grid -> the official layer's (B, N, C) output."""
    b, n, c = x.shape
    a, w = grid
    spectrum = torch.fft.rfft2(x.reshape(b, a, w, c), dim=(1, 2), norm="ortho")
    filt = torch.complex(p["complex_weight"][..., 0], p["complex_weight"][..., 1])
    out = torch.fft.irfft2(spectrum * filt, s=(a, w), dim=(1, 2), norm="ortho")
    return out.reshape(b, n, c)


def to_attnlab(attn, p: dict) -> None:
    with torch.no_grad():
        attn.filter_real.copy_(p["complex_weight"][..., 0])
        attn.filter_imag.copy_(p["complex_weight"][..., 1])


def run_both(attn, grid, channels, seed, image_input):
    gen = torch.Generator().manual_seed(seed)
    p = official_params(grid, channels, gen)
    x = torch.randn(B, grid[0] * grid[1], channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xo = leaf(x)
    y_off = official_forward(p, xo, grid)
    (y_off * weight).sum().backward()

    to_attnlab(attn, p)
    xa = leaf(x)
    if image_input:  # (B, H, W, C)
        y = attn(xa.view(B, *grid, channels)).reshape(x.shape)
    else:  # (B, L, C) with the grid given
        y = attn(xa, spatial=grid)
    (y * weight).sum().backward()
    grad_w = torch.stack([attn.filter_real.grad, attn.filter_imag.grad], -1)
    return {"out": (y, y_off), "grad x": (xa.grad, xo.grad),
            "grad complex_weight": (grad_w, p["complex_weight"].grad)}


@pytest.mark.parametrize("grid,heads,channels,image_input", [
    ((4, 4), 2, 8, True), ((3, 5), 3, 6, False), ((6, 4), 1, 5, True), ((5, 6), 4, 8, False)])
def test_spectral_equals_the_official_module(grid, heads, channels, image_input):
    attn = al.build("spectral", dim=channels, heads=heads, grid_size=grid).double()
    assert {n for n, _ in attn.named_parameters()} == {"filter_real", "filter_imag"}
    assert_parity(run_both(attn, grid, channels, 30 + channels, image_input))


def test_spectral_with_identity_projections_equals_the_official_module():
    """projections=True (the earlier formulation) with identity value and output maps."""
    grid, channels = (4, 6), 8
    attn = al.build("spectral", dim=channels, heads=2, grid_size=grid,
                    projections=True).double()
    with torch.no_grad():
        attn.qkv.v.weight.copy_(torch.eye(channels))
        attn.o_proj.weight.copy_(torch.eye(channels))
    assert_parity(run_both(attn, grid, channels, 41, True))


def test_spectral_defaults_are_the_official_ones():
    dim = 384
    attn = al.build("spectral", dim=dim, heads=6)
    # the official layer for 224 x 224 images, patch 16: h = 14, w = 14 // 2 + 1 = 8, no
    # projections, filter 0.02 * N(0, 1) in both parts
    assert {n: tuple(t.shape) for n, t in attn.named_parameters()} == {
        "filter_real": (14, 8, dim), "filter_imag": (14, 8, dim)}
    both = torch.cat([attn.filter_real.detach().flatten(), attn.filter_imag.detach().flatten()])
    assert abs(both.std().item() - 0.02) < 0.0005 and abs(both.mean().item()) < 0.0005
    assert both.abs().max().item() > 0.02 * 3.5  # normal, not truncated at 2 std
    with pytest.raises(ValueError, match="heads \\* head_dim"):
        al.build("spectral", dim=16, heads=4, head_dim=8)
    assert al.build("spectral", dim=16, heads=4, head_dim=8, projections=True) is not None
