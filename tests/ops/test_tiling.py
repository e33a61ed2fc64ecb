"""The row-tiled engine's tile shape: heads x rows x keys scores."""

import pytest
import torch

from attnlab.ops.tiled import CACHE_TILE_ELEMENTS, MIN_ROWS, TILE_ELEMENTS, auto_tiling


@pytest.mark.parametrize("batch_heads", [1, 3, 8, 64])
@pytest.mark.parametrize("lk", [1, 100, 1024, 4096, 1 << 17])
def test_cpu_tiles_take_as_many_heads_as_fit_the_cache_budget(batch_heads, lk):
    heads, rows = auto_tiling(batch_heads, lk, torch.device("cpu"))
    assert 1 <= heads <= batch_heads and rows >= MIN_ROWS
    assert heads == 1 or heads * rows * lk <= CACHE_TILE_ELEMENTS
    assert heads == batch_heads or (heads + 1) * rows * lk > CACHE_TILE_ELEMENTS
    assert heads * rows * lk <= TILE_ELEMENTS or rows == MIN_ROWS


def test_an_explicit_block_size_sets_the_rows_and_the_heads_follow():
    heads, rows = auto_tiling(8, 1024, torch.device("cpu"), block_size=32)
    assert (heads, rows) == (min(8, CACHE_TILE_ELEMENTS // (32 * 1024)), 32)


def test_other_devices_take_every_head_at_once():
    heads, rows = auto_tiling(64, 4096, torch.device("meta"))
    assert heads == 64 and 64 * rows * 4096 <= TILE_ELEMENTS


def test_cpu_bf16_inputs_run_float32_gemms():
    """On the CPU the engine computes bf16 inputs as their float32 copies would be (bf16 GEMMs
    on cache-sized tiles lost to their conversions), returning bf16 output and gradients."""
    from attnlab.ops import sigmoid_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 32, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    out = sigmoid_attention(q, k, v, causal=True, backend="tiled")
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    copies = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = sigmoid_attention(*copies, causal=True, backend="tiled")
    ref_grads = torch.autograd.grad(ref.bfloat16().float().sum(), copies)
    assert out.dtype == torch.bfloat16 and all(d.dtype == torch.bfloat16 for d in grads)
    assert torch.equal(out, ref.bfloat16())
    for d, rd in zip(grads, ref_grads, strict=True):
        assert torch.equal(d, rd.bfloat16())
