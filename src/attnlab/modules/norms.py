"""qk-norm: a norm on each head's queries and keys before the op (RMSNorm by default)."""

from __future__ import annotations

from torch import Tensor, nn

QK_NORM_KINDS = ("rms", "layer")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    raise ValueError(f"qk-norm kind must be one of {QK_NORM_KINDS}, got {kind!r}")


class QKNorm(nn.Module):
    """``q -> N(q)``, ``k -> N(k)`` per head (width ``dim``); both identities when
    ``enabled`` is False. ``kind``: ``"rms"`` (``nn.RMSNorm``, the default) or ``"layer"``
    (``nn.LayerNorm``: affine with a bias, eps 1e-5, as the official sigmoid attention).
    ``shared``: one norm for both (mechanisms whose keys are their queries, such as SOFT)."""

    q: nn.Module
    k: nn.Module

    def __init__(self, dim: int, enabled: bool, *, shared: bool = False,
                 kind: str = "rms") -> None:
        super().__init__()
        if kind not in QK_NORM_KINDS:
            raise ValueError(f"qk-norm kind must be one of {QK_NORM_KINDS}, got {kind!r}")
        self.q = _norm(kind, dim) if enabled else nn.Identity()
        self.k = self.q if shared or not enabled else _norm(kind, dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)
