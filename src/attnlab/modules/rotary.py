"""Rotary position embedding (RoPE, "RoFormer"), applied to (B, H, L, D) tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    """Rotates pairs of channels by position-dependent angles: q_m -> R(m theta) q_m.

    Uses the half-split pairing (channel i with channel i + D/2). ``positions`` are absolute
    token positions, so a decoding step continues exactly where the prefill stopped.
    ``rotary_dim``: rotate only the first ``rotary_dim`` channels (partial RoPE; the rest pass
    unchanged; rounded up to even), all of them by default. ``float32_frequencies``: compute
    the frequencies and angles as Hugging Face's default RoPE does, 1 / base^(2i / d) in
    float32 steps (a few differ by one float32 ulp from the correctly rounded base^(-2i / d)
    used otherwise) and the angles in float32 whatever the module's dtype, for modules that
    must equal an official Hugging Face model.
    """

    inv_freq: Tensor  # a non-persistent buffer (register_buffer)

    def __init__(self, head_dim: int, base: float = 10000.0, *, rotary_dim: int | None = None,
                 float32_frequencies: bool = False) -> None:
        super().__init__()
        if rotary_dim is None and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        # frequencies i / rotary_dim for even i < rotary_dim, each rotating a pair: an odd
        # rotary_dim rotates one more channel (as Hugging Face's partial RoPE does)
        width = 2 * ((rotary_dim + 1) // 2)
        if not 0 < width <= head_dim:
            raise ValueError(f"rope: rotary dim {rotary_dim} does not fit head_dim={head_dim}")
        self.rotary_dim, self.float32_frequencies = width, float32_frequencies
        self.base, self._frequency_dim = base, rotary_dim
        # float32 whatever the module's dtype (``_apply``), recomputed, never loaded (not in
        # the state dict) nor rounded: ``.to(torch.bfloat16)`` keeps it float32
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device: torch.device | str | None = None) -> Tensor:
        """The float32 inverse frequencies (rotary_dim / 2,), computed afresh on the CPU (the
        same values on every device) and moved to ``device`` (default: the default device)."""
        rotary_dim, base = self._frequency_dim, self.base
        if self.float32_frequencies:
            steps = torch.arange(0, rotary_dim, 2, dtype=torch.int64,
                                 device="cpu").float() / rotary_dim
            inv_freq = 1.0 / (base ** steps)
        else:
            inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64,
                                              device="cpu") / rotary_dim)
        return inv_freq.float().to(torch.get_default_device() if device is None else device)

    def reset_parameters(self) -> None:
        """Recompute ``inv_freq`` (a non-persistent buffer) on its device, in float32 (float64
        in a float64 module: the same values widened)."""
        dtype = torch.float64 if self.inv_freq.dtype == torch.float64 else torch.float32
        self.inv_freq = self.frequencies(self.inv_freq.device).to(dtype)

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)`` / ``half()`` / ``to_empty()`` would round or drop the
        # frequencies: recompute them on the new device (float32, or float64 in a float64
        # module, as before) after the move
        super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:
            self.reset_parameters()
        return self

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """``x`` (B, H, L, D) rotated by ``positions``: (L,), shared by the batch, or (B, L),
        one row of positions per sequence (a left-padded batch counts each row from its first
        real token); the angles broadcast over the heads."""
        cos, sin = self._cos_sin(positions, x.dtype)
        return self._rotate(x, cos, sin)

    def rotate_pair(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(self(q, positions), self(k, positions))``, bitwise, computing the angles, cos and
        sin once when q and k share a dtype. A subclass that overrides ``forward``, or a
        module with forward hooks, gets the two calls themselves."""
        if (type(self).forward is not Rotary.forward or self._forward_hooks
                or self._forward_pre_hooks):
            return self(q, positions), self(k, positions)
        cos, sin = self._cos_sin(positions, q.dtype)
        if k.dtype != q.dtype:
            return self._rotate(q, cos, sin), self(k, positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles of ``positions``, cast to ``dtype``: (L, D/2) for (L,)
        positions, (B, 1, L, D/2) for (B, L)."""
        inv_freq = self.inv_freq
        if inv_freq.is_meta and not positions.is_meta:  # built on meta, loaded with assign=True
            inv_freq = self.frequencies(positions.device)
        if self.float32_frequencies:  # angles in float32 whatever the module's dtype, as HF
            inv_freq = inv_freq.float()
        if positions.dim() == 2:  # per row: (B, L) -> (B, 1, L, D/2), over every head
            angles = (positions.to(torch.float32)[:, :, None] * inv_freq[None, None, :])[:, None]
        else:
            angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x`` rotated by the given cos and sin (the first ``rotary_dim`` channels)."""
        rest = None
        if self.rotary_dim < x.shape[-1]:
            x, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out if rest is None else torch.cat((out, rest), dim=-1)


class NoRotation(nn.Module):
    """The rotary slot of a module without ``rope=``: positions ((L,) or (B, L)) change
    nothing."""

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return x

    def rotate_pair(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q and k unchanged."""
        return q, k
