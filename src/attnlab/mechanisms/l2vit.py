"""L2ViT's global linear attention with its local concentration module."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.linear import LinearFamily
from attnlab.modules.spatial import DepthwiseConv, grid_of
from attnlab.ops.common import upcast

DENOMINATOR_FLOOR = 100.0


class LocalConcentration(nn.Module):
    """LCM(y) = y + DWConv7x7(BN(GELU(DWConv7x7(y)))) on the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = DepthwiseConv(dim, 7)
        self.norm = nn.BatchNorm1d(dim)
        self.conv2 = DepthwiseConv(dim, 7)

    def forward(self, y: Tensor, grid: tuple[int, int], keep: Tensor | None) -> Tensor:
        h = F.gelu(self.conv1(y, grid, keep))
        # BatchNorm over the real tokens only: in training its statistics come from every
        # real token of the batch (the paper's BN), never from padding
        if keep is None:
            h = self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        else:
            h = h.new_zeros(h.shape).masked_scatter(keep[..., None], self.norm(h[keep]))
        out = y + self.conv2(h, grid, keep)
        return out if keep is None else out * keep[..., None].to(out.dtype)


@register("l2vit", family="linear",
          paper="The Linear Attention Resurrection in Vision Transformer",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n d^2", weights=True, cross=True, variants=({"lcm": False},))
class L2ViTAttention(LinearFamily):
    """L2ViT global linear attention followed by the local concentration module (LCM).

    "The Linear Attention Resurrection in Vision Transformer" (L2ViT), with phi = relu:

        out_i = tau_h phi(q_i) (sum_j phi(k_j)^T v_j) / max(phi(q_i) . sum_j phi(k_j), 100),

    tau_h learnable per head (initialised to c = d^-1/2); then, after the output projection,
    LCM(y) = y + DWConv7x7(BN(GELU(DWConv7x7(y)))) on the token grid (``lcm=False`` drops
    it). The paper alternates these blocks with local 7 x 7 window attention — a model-level
    choice (``TransformerLM`` / ``ViT`` take a mechanism per layer). Padded tokens are zeroed
    before each convolution. The LCM's BatchNorm makes a sequence's output depend on the
    other sequences of the batch in training mode (batch statistics over their real tokens,
    as in the paper); in eval mode it uses its running statistics and sequences are
    independent.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "lcm": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, lcm: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.tau = nn.Parameter(torch.full((self.heads,), self.head_dim ** -0.5))
        self.lcm = LocalConcentration(dim) if lcm else None

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        fq, fk = F.relu(q), F.relu(self.expand_kv(k))
        if call.key_mask is not None:
            fk = fk * call.key_mask[:, None, :, None].to(fk.dtype)
        den = (fq * fk.sum(2, keepdim=True)).sum(-1, keepdim=True).clamp_min(DENOMINATOR_FLOOR)
        return self.tau.view(1, -1, 1, 1).to(q.dtype) * (fq @ fk.transpose(-1, -2)) / den

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        dtype = v.dtype
        # in float32 at least: the sums over the sequence overflow float16
        fq, fk, v = upcast(F.relu(q), F.relu(self.expand_kv(k)), self.expand_kv(v))
        if call.key_mask is not None:
            keep = call.key_mask[:, None, :, None].to(fk.dtype)
            fk, v = fk * keep, v * keep
        kv = fk.transpose(-1, -2) @ v  # (B, H, D, Dv): linear in n
        den = (fq * fk.sum(2, keepdim=True)).sum(-1, keepdim=True).clamp_min(DENOMINATOR_FLOOR)
        return (self.tau.view(1, -1, 1, 1).to(fq.dtype) * (fq @ kv) / den).to(dtype)

    def post(self, y: Tensor, call: Call) -> Tensor:
        if self.lcm is None:
            return y
        # the LCM runs on the queries' grid: with context=, the key mask is the context's
        keep = call.key_mask if call.context is None else None
        return self.lcm(y, grid_of(y.shape[1], call.spatial), keep)
