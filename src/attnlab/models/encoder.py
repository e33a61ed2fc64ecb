"""Bidirectional models: a pre-norm ``Encoder`` and a ``ViT`` image classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnlab.core.registry import info
from attnlab.models.blocks import Block, layer_specs, sum_extra_losses


class Encoder(nn.Module):
    """``depth`` bidirectional pre-norm blocks over (B, L, dim) or (B, H, W, dim) features.

    Image inputs go to the mechanisms as (B, H, W, dim) when every layer's mechanism lists
    the ``image`` domain (so windowed and grid mechanisms see the 2-D layout), flattened to
    (B, H*W, dim) otherwise.

    Args:
        dim, depth, heads: width, number of blocks, attention heads.
        mechanism: a registered name, or one name per layer.
        mechanism_kwargs: keyword arguments for the mechanism(s): one dict, or one per layer.
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4,
                 mechanism: str | Sequence[str] = "softmax",
                 mechanism_kwargs: dict | Sequence[dict] | None = None, *,
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        specs = layer_specs(mechanism, mechanism_kwargs, depth)
        self.blocks = nn.ModuleList(Block(dim, heads, n, {"causal": False, **kw}, mlp_ratio,
                                          dropout) for n, kw in specs)
        self.mechanisms = [n for n, _ in specs]
        self.spatial_ok = all("image" in info(n).domains for n in self.mechanisms)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """x (B, L, dim) with optional key padding ``mask`` (B, L), or (B, H, W, dim)."""
        if x.dim() not in (3, 4):
            raise ValueError(f"Encoder expects (B, L, dim) or (B, H, W, dim), got "
                             f"{tuple(x.shape)}")
        shape = x.shape
        if x.dim() == 4 and not self.spatial_ok:
            x = x.flatten(1, 2)
            if isinstance(mask, Tensor) and mask.dim() == 3:  # (B, H, W) with the tokens
                mask = mask.flatten(1, 2)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x).reshape(shape)

    def extra_loss(self) -> Tensor:
        """Sum of the mechanisms' auxiliary losses of the last forward."""
        return sum_extra_losses((b.attn for b in self.blocks), self.norm.weight)


class ViT(nn.Module):
    """Vision transformer: patch embedding, learned positions, ``Encoder``, mean pooling.

    Args:
        image_size: (height, width) or one int; must be divisible by ``patch_size``.
        patch_size: side of the square patches.
        channels, classes: input channels and number of classes.
        dim, depth, heads, mechanism, mechanism_kwargs: as in ``Encoder``.
    """

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, channels: int,
                 classes: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 mechanism: str | Sequence[str] = "softmax",
                 mechanism_kwargs: dict | Sequence[dict] | None = None, *,
                 mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {(h, w)} is not divisible by patch_size={patch_size}")
        self.grid = (h // patch_size, w // patch_size)
        self.channels = channels
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, *self.grid, dim) * 0.02)
        self.encoder = Encoder(dim, depth, heads, mechanism, mechanism_kwargs,
                               mlp_ratio=mlp_ratio, dropout=dropout)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, channels, H, W) -> logits (B, classes)."""
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"ViT expects images (B, {self.channels}, H, W), got "
                             f"{tuple(images.shape)}")
        x = self.patch(images).permute(0, 2, 3, 1)  # (B, h, w, dim)
        if x.shape[1:3] != self.grid:
            raise ValueError(f"images give a {tuple(x.shape[1:3])} patch grid, the model was "
                             f"built for {self.grid}")
        x = self.encoder(x + self.pos)
        return self.head(x.flatten(1, 2).mean(1))

    def extra_loss(self) -> Tensor:
        return self.encoder.extra_loss()
