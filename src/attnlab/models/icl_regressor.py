"""One attention layer that regresses in context, as in the in-context regression papers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from attnlab.core.registry import available, build, info
from attnlab.models.blocks import layer_specs, sum_extra_losses


class ICLRegressor(nn.Module):
    """Attention over tokens z_i = [x_i; y_i] (i <= L) and the query z_q = [x_q; 0].

    "In-Context Linear Regression Demystified" (He et al., 2025): a one-layer multi-head
    attention reads the prediction off the last coordinate of its output at the query,

        y_hat = (sum_h W_O^h attn_h(Z))[query, -1],

    where every head's keys and values are the L context tokens only (each layer is a
    cross-attention of all L + 1 tokens over the L context tokens, so the query never attends
    to its own 0 label; the mechanism must support ``context=``). No positions: the model is
    invariant to the order of the pairs, so it runs at any context length. ``depth > 1``
    stacks residual attention layers (the paper uses 1; with one layer the residual adds
    the query's 0 label, so y_hat is the attention output itself).

    Args:
        d: covariate dimension (tokens have d + 1 coordinates).
        heads: attention heads; ``head_dim`` defaults to d + 1 (each head a full bilinear
            form on the token, as in the paper).
        mechanism, mechanism_kwargs: a registered name (or one per layer) and its arguments.
        targets: output coordinates (1 for scalar regression).
    """

    def __init__(self, d: int, heads: int = 2, mechanism: str | Sequence[str] = "softmax",
                 mechanism_kwargs: dict | Sequence[dict] | None = None, *,
                 head_dim: int | None = None, depth: int = 1, targets: int = 1) -> None:
        super().__init__()
        for name, value in (("d", d), ("targets", targets), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ICLRegressor: {name} must be an int >= 1, got {value!r}")
        self.d, self.targets = d, targets
        dim = d + targets
        specs = layer_specs(mechanism, mechanism_kwargs, depth)
        if any("causal" in kw for _, kw in specs):
            raise ValueError("ICLRegressor: causal is not a mechanism argument here (every "
                             "token attends to the whole context)")
        no_cross = sorted({n for n, _ in specs if not info(n).cross})
        if no_cross:
            raise ValueError(f"ICLRegressor attends from every token to the context tokens "
                             f"(cross-attention, context=), which {', '.join(no_cross)} does "
                             f"not support; mechanisms that do: "
                             f"{', '.join(n for n in available() if info(n).cross)}")
        self.layers = nn.ModuleList(
            build(n, dim=dim, heads=heads, **{"head_dim": head_dim or dim, "causal": False,
                                               **kw}) for n, kw in specs)
        self.mechanisms = [n for n, _ in specs]

    def tokens(self, x: Tensor, y: Tensor, x_query: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (B, L + 1, d + targets) and the key mask (B, L + 1) (query = False)."""
        if x.dim() != 3 or x.shape[-1] != self.d or x_query.shape != (x.shape[0], self.d):
            raise ValueError(f"ICLRegressor: expected x (B, L, {self.d}) and x_query "
                             f"(B, {self.d}), got "
                             f"{tuple(x.shape)} and {tuple(x_query.shape)}")
        y = y.unsqueeze(-1) if y.dim() == 2 else y
        if y.shape != (*x.shape[:2], self.targets):
            raise ValueError(f"ICLRegressor: expected y (B, L) or (B, L, {self.targets}), got "
                             f"{tuple(y.shape)}")
        context = torch.cat([x, y], dim=-1)
        query = torch.cat([x_query, x_query.new_zeros(x.shape[0], self.targets)], dim=-1)
        z = torch.cat([context, query[:, None]], dim=1)
        mask = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        mask[:, -1] = False
        return z, mask

    def forward(self, x: Tensor, y: Tensor, x_query: Tensor) -> Tensor:
        """x (B, L, d), y (B, L) or (B, L, targets), x_query (B, d) -> y_hat (B[, targets])."""
        z, _ = self.tokens(x, y, x_query)
        for layer in self.layers:  # residual; the query's label coordinates start at 0
            z = z + layer(z, context=z[:, :-1])
        pred = z[:, -1, self.d:]
        return pred.squeeze(-1) if self.targets == 1 else pred

    def extra_loss(self) -> Tensor:
        return sum_extra_losses(self.layers, cast(Tensor, self.layers[0].head_scale))
