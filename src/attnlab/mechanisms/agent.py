"""Agent attention."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import SQUARE, Arg, is_square
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.base import Attention
from attnlab.modules.spatial import DepthwiseConv, grid_of, masked_pool
from attnlab.ops.softmax import softmax_weights


@register("agent", family="linear",
          paper="Agent Attention: On the Integration of Softmax and Linear Attention",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n m d", weights=True, cross=False, weights_exact=False,
          variants=({"dwconv": False}, {"agents": 4}))
class AgentAttention(Attention):
    """Agent attention: m agent tokens aggregate from the keys, then broadcast to the queries.

    "Agent Attention: On the Integration of Softmax and Linear Attention" (LeapLabTHU):
    A = pool(Q) to m agents (adaptive average pooling on the token grid, over real tokens;
    m = ``agents`` = 49 = 7 x 7 by default),

        V_A = softmax(c A K^T + B1) V,    O = softmax(c Q A^T + B2) V_A + DWConv3x3(V),

    B1, B2 learnable agent biases: (heads, m, 7, 7) tables resized to the token grid (a
    sequence is a 1 x L grid). The implied n x n matrix softmax(QA^T + B2) softmax(AK^T + B1)
    is non-negative with rows summing to 1; the DWConv term is the ``local_term``.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "agents": Arg("int", low=1, rule=SQUARE, test=is_square),
        "dwconv": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, agents: int = 49, dwconv: bool = True,
                 **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        side = math.isqrt(agents)
        self.agents, self.agent_grid = agents, (side, side)
        self.bias_to_keys = nn.Parameter(torch.zeros(heads, agents, 7, 7))
        self.bias_to_agents = nn.Parameter(torch.zeros(heads, agents, 7, 7))
        self.dwconv = DepthwiseConv(self.kv_heads * self.head_dim, 3) if dwconv else None
        self.weights_reproduce_output = not dwconv

    def _bias(self, table: Tensor, grid: tuple[int, int]) -> Tensor:
        """(heads, m, 7, 7) -> (heads, m, n) by bilinear resizing to the token grid."""
        return F.interpolate(table, size=grid, mode="bilinear", align_corners=False).flatten(2)

    def _parts(self, q: Tensor, k: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        """softmax(c Q A^T + B2) (B, H, n, m) and softmax(c A K^T + B1) (B, H, m, n)."""
        grid = grid_of(q.shape[2], call.spatial)
        agents = masked_pool(q, call.key_mask, grid, self.agent_grid)
        to_keys = softmax_weights(agents, k, mask=call.op_mask,
                                  bias=self._bias(self.bias_to_keys, grid))
        to_agents = softmax_weights(q, agents,
                                    bias=self._bias(self.bias_to_agents, grid).transpose(-1, -2))
        return to_agents, to_keys

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        to_agents, to_keys = self._parts(q, k, call)
        return to_agents.to(v.dtype) @ (to_keys.to(v.dtype) @ self.expand_kv(v))

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        to_agents, to_keys = self._parts(q, k, call)
        return to_agents @ to_keys

    def local_term(self, v: Tensor, call: Call) -> Tensor | None:
        if self.dwconv is None:
            return None
        grid = grid_of(v.shape[2], call.spatial)
        flat = v.transpose(1, 2).flatten(2)  # (B, L, H_kv * D)
        out = self.dwconv(flat, grid, call.key_mask)
        return self.expand_kv(self.split_heads(out, self.kv_heads))
