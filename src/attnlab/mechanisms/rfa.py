"""Random-feature attention layer (frozen random query-key matrices)."""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call, HeadShape
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.projections import split_heads
from attnlab.modules.reset import reset_module
from attnlab.ops.rfa import ACTIVATIONS, random_feature_attention, random_feature_weights


def random_matrices(heads: int, dim: int, identity_mean: float, seed: int | None,
                    device: torch.device | str | None = None) -> Tensor:
    """(M, C, C) float32: N(0, 1/C) entries plus ``identity_mean`` I / sqrt(C), drawn from
    torch's default generator (``seed`` None: each layer its own draw, reproducible under
    ``torch.manual_seed``) or from a generator seeded with ``seed`` (on the CPU, then moved
    to ``device``: the same matrices on every device)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    draw_on = "cpu" if g is not None and device is not None else device
    w = torch.randn(heads, dim, dim, generator=g, device=draw_on) / dim ** 0.5
    w = w + identity_mean * torch.eye(dim, device=w.device) / dim ** 0.5
    return w if device is None else w.to(device)


class RandomFeatureProjection(nn.Module):
    """q = x itself per head, k = W_m x with frozen random W_m (a buffer), v = a linear map."""

    random_qk: Tensor  # a buffer (register_buffer)

    def __init__(self, shape: HeadShape, *, identity_mean: float, seed: int | None) -> None:
        super().__init__()
        self.shape = shape
        self.v = nn.Linear(shape.dim, shape.kv_heads * shape.head_dim, bias=shape.bias)
        self.identity_mean, self.seed = identity_mean, seed
        w = random_matrices(shape.heads, shape.dim, identity_mean, seed)
        self.register_buffer("random_qk", w)  # frozen: a buffer, never trained

    def reset_parameters(self) -> None:
        """v as built; the random features drawn again (the same ones for a fixed ``seed``,
        from the default generator otherwise, after v's draws as in the constructor)."""
        reset_module(self.v)
        with torch.no_grad():
            self.random_qk.copy_(random_matrices(self.shape.heads, self.shape.dim,
                                                 self.identity_mean, self.seed,
                                                 device=self.random_qk.device))

    def forward(self, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        src = call.source
        q = call.x.unsqueeze(1).expand(-1, self.shape.heads, -1, -1)
        k = torch.einsum("blc,mdc->bmld", src, self.random_qk.to(src.dtype))
        return q, k, split_heads(self.v(src), self.shape.kv_heads)


@register("rfa", family="linear",
          paper="What can a Single Attention Layer Learn? A Study Through the Random Features "
                "Lens",
          causal=True, bidirectional=True, decode=True, domains=("seq",), complexity="n^2 C",
          weights=True, cross=True, unsupported=("kv_heads", "qk_norm", "rope"),
          variants=({"activation": "sigmoid", "identity_mean": 1.0},))
class RandomFeatureAttention(Attention):
    """An attention layer whose M heads have frozen random query-key matrices.

    "What can a Single Attention Layer Learn? A Study Through the Random Features Lens":

        f(x_t; X) = sum_m (1 / N_t) sum_i sigma(x_t^T W_m x_i) V_m x_i

    over the N_t keys x_t sees. W_m (C x C) are frozen: Gaussian N(0, 1/C) entries plus
    ``identity_mean`` * I / sqrt(C) (the paper's option of a mean proportional to I); only
    the values V_m (the value and output projections) train. ``seed``: None (default) draws
    W_m from torch's generator at construction, so the layers of a model are independent and
    ``torch.manual_seed`` reproduces them; an int fixes them. ``activation``: relu (default),
    sigmoid, tanh. q = x_t and k = W_m x_i enter the op (width C), so hook_q/hook_k are
    (B, M, L, C). Backends: ``tiled`` (default, memory-bounded), ``reference`` (dense).
    """

    backends = ("auto", "reference", "tiled")

    arguments: ClassVar[dict[str, Arg]] = {
        "activation": Arg("str", choices=tuple(sorted(ACTIVATIONS))),
        "identity_mean": Arg("float"),
        "seed": Arg("int", optional=True, low=0),
    }

    def __init__(self, dim: int, heads: int, *, activation: str = "relu",
                 identity_mean: float = 0.0, seed: int | None = None, **kwargs) -> None:
        projection = functools.partial(RandomFeatureProjection, identity_mean=identity_mean,
                                       seed=seed)
        super().__init__(dim, heads, projection=projection, **kwargs)
        self.activation = activation

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        return random_feature_weights(q, k, causal=self.causal, mask=call.op_mask,
                                      activation=self.activation)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        return random_feature_attention(q, k, v, causal=self.causal, mask=call.op_mask,
                                        activation=self.activation, backend=self.backend)
