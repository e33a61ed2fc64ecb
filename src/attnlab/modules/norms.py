"""qk-norm: RMSNorm on each head's queries and keys before the op."""

from __future__ import annotations

from torch import Tensor, nn


class QKNorm(nn.Module):
    """``q -> RMSNorm(q)``, ``k -> RMSNorm(k)`` per head (width ``dim``); both identities
    when ``enabled`` is False. ``shared``: one norm for both (mechanisms whose keys are their
    queries, such as SOFT)."""

    def __init__(self, dim: int, enabled: bool, *, shared: bool = False) -> None:
        super().__init__()
        self.q = nn.RMSNorm(dim) if enabled else nn.Identity()
        self.k = self.q if shared or not enabled else nn.RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)
