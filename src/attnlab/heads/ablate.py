"""Remove chosen heads: zero their output, replace it by its mean over a dataset, or by its
value on another input (resampling). Works through ``head_scale`` and ``hook_heads``, so the
model's code is not touched; everything is restored when the block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from attnlab.heads.capture import capture
from attnlab.heads.sites import HeadSelection, by_layer, forward_hooks, head_pairs, sites

__all__ = ["ablate", "head_outputs", "mean_head_outputs", "scale_heads"]


@contextlib.contextmanager
def ablate(model: nn.Module, heads: HeadSelection, how: str = "zero", *,
           values: dict[int, Tensor] | None = None) -> Iterator[None]:
    """Ablate ``heads`` (``{layer: [heads]}`` or ``[(layer, head)]``) inside the block.

    ``how``: ``"zero"`` (the head's output is 0: ``head_scale`` = 0), ``"mean"`` (its output
    at every position is ``values[layer][head]``, (H, D), e.g. from ``mean_head_outputs``) or
    ``"resample"`` (its output is ``values[layer][..., head, :]``, (B, L, H, D), the head's
    output on another input, e.g. from ``head_outputs``; same batch and length)."""
    model_sites = sites(model)
    chosen = by_layer(head_pairs(heads, model_sites))
    if how not in ("zero", "mean", "resample"):
        raise ValueError(f"how must be 'zero', 'mean' or 'resample', got {how!r}")
    if how != "zero":
        missing = [layer for layer in chosen if values is None or layer not in values]
        if missing:
            raise ValueError(f"how={how!r} needs values for layers {missing} (from "
                             f"{'mean_head_outputs' if how == 'mean' else 'head_outputs'})")
    if how == "zero":
        with scale_heads(model, heads, 0.0):
            yield
        return

    def replacing(value: Tensor, index: Tensor) -> Callable[..., Tensor]:
        def replace(_m, _i, out):
            out = out.clone()
            v = value.to(out.device, out.dtype)
            if how == "mean":
                out[..., index, :] = v[index]
            else:
                if v.shape != out.shape:
                    raise ValueError(f"resampled head outputs have shape {tuple(v.shape)}"
                                     f", this input's are {tuple(out.shape)}")
                out[..., index, :] = v[..., index, :]
            return out
        return replace

    assert values is not None  # how != "zero": checked above
    hooks = {layer: replacing(values[layer], torch.tensor(hs)) for layer, hs in chosen.items()}
    with forward_hooks(model_sites, "heads", hooks):
        yield


@contextlib.contextmanager
def scale_heads(model: nn.Module, heads: HeadSelection, factor: float) -> Iterator[None]:
    """Inside the block, the outputs of ``heads`` are multiplied by ``factor`` (through
    ``head_scale``): 0 ablates them, > 1 reinforces them (VHR, "Cracking the Code of
    Hallucination in LVLMs with Vision-aware Head Divergence")."""
    model_sites = sites(model)
    chosen = by_layer(head_pairs(heads, model_sites))
    saved = {}
    try:
        for layer, hs in chosen.items():
            module = model_sites[layer].module
            saved[layer] = module.head_scale.clone()
            module.head_scale[hs] = module.head_scale[hs] * factor
        yield
    finally:
        for layer, scale in saved.items():
            model_sites[layer].module.head_scale.copy_(scale)


def head_outputs(model: nn.Module, run: Callable[[], object]) -> dict[int, Tensor]:
    """Every layer's per-head output (B, L, H, D) during ``run()`` (one forward)."""
    model_sites = sites(model)
    names = [f"L{s.layer}.heads" for s in model_sites]
    with torch.no_grad(), capture(model, names) as cap:
        run()
    return {s.layer: cap.records[f"L{s.layer}.heads"][-1] for s in model_sites}


def mean_head_outputs(model: nn.Module, runs: Iterable[Callable[[], object]],
                      key_masks: Iterable[Tensor | None] | None = None) -> dict[int, Tensor]:
    """Each layer's mean per-head output (H, D) over every real position of every ``run()``
    (``key_masks``: (B, L) True for real tokens, one per run; default all)."""
    sums: dict[int, Tensor] = {}
    count: dict[int, Tensor] = {}
    masks = iter(key_masks) if key_masks is not None else None
    for run in runs:
        outs = head_outputs(model, run)
        mask = next(masks) if masks is not None else None
        for layer, out in outs.items():  # (B, L, H, D)
            keep = torch.ones(out.shape[:2]) if mask is None else mask.float().cpu()
            sums[layer] = sums.get(layer, 0) + (out.float() * keep[..., None, None]).sum((0, 1))
            count[layer] = count.get(layer, 0) + keep.sum()
    if not sums:
        raise ValueError("mean_head_outputs needs at least one run")
    return {layer: sums[layer] / count[layer] for layer in sums}
