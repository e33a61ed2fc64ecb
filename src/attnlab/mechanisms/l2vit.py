"""L2ViT's global linear attention; its block's local concentration module and conditional
position encoding are residual branches it contributes to attnlab's blocks."""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg, deprecated_alias
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.linear import LinearFamily
from attnlab.modules.spatial import DepthwiseConv
from attnlab.ops.common import upcast

DENOMINATOR_FLOOR = 100.0


def _tokens(x: Tensor, mask: Tensor | None) -> tuple[Tensor, tuple[int, int], Tensor | None]:
    """A block's input (B, L, C) or (B, H, W, C) as tokens (B, L, C), their 2-D grid (an
    image's (H, W), (1, L) for a sequence) and the key padding mask as (B, L)."""
    grid = tuple(x.shape[1:3]) if x.dim() == 4 else (1, x.shape[1])
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    keep = None if mask is None else mask.reshape(x.shape[0], -1)
    return tokens, cast("tuple[int, int]", grid), keep


class LocalConcentration(nn.Module):
    """The official LCM: DWConv7x7(BN(GELU(DWConv7x7(y)))) on the token grid (convolutions
    with bias, BatchNorm over the channels)."""

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
        return self.conv2(h, grid, keep)


class ConcentrationBranch(nn.Module):
    """The LCM's residual branch of an L2ViT block: x -> LCM(LayerNorm(x)) (the block adds
    x); padded tokens are zeroed before each convolution and in the branch's output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lcm = LocalConcentration(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens, grid, keep = _tokens(x, mask)
        out = self.lcm(self.norm(tokens), grid, keep)
        if keep is not None:
            out = out.masked_fill(~keep[..., None], 0)
        return out.reshape(x.shape)


class ConditionalPosition(nn.Module):
    """The conditional position encoding (CPE) that opens an L2ViT block: x -> DWConv3x3(x)
    with bias (the block adds x); padded tokens are zeroed before the convolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = DepthwiseConv(dim, 3)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens, grid, keep = _tokens(x, mask)
        out = self.conv(tokens, grid, keep)
        if keep is not None:
            out = out.masked_fill(~keep[..., None], 0)
        return out.reshape(x.shape)


@register("l2vit", family="linear",
          paper="The Linear Attention Resurrection in Vision Transformer",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n d^2", weights=True, cross=True, variants=({"bias": False},))
class L2ViTAttention(LinearFamily):
    """L2ViT global linear attention; its block's LCM and CPE are residual branches.

    "The Linear Attention Resurrection in Vision Transformer" (L2ViT; official module
    ``LinearAttention`` in ``LGABlock`` of ChuanyangZheng/L2ViT), with phi = relu:

        out_i = tau_h phi(q_i) (sum_j phi(k_j)^T v_j) / max(phi(q_i) . sum_j phi(k_j), 100),

    tau_h learnable per head (initialised to c = d^-1/2), q, k, v and the output projection
    with biases (``bias``). The official block around it (``LGABlock``) is

        x = x + CPE(x),  x = x + W_o out(LN(x)),  x = x + LCM(LN(x)),  x = x + MLP(LN(x)),

    CPE = DWConv3x3, LCM = DWConv7x7(BN(GELU(DWConv7x7(.)))): these two are residual
    branches of the block, not of the attention, so this module contributes them through
    :meth:`residual_branches`, which attnlab's blocks (``models.blocks.Block``: the
    ``Encoder``, ``ViT`` and ``TransformerLM``) build around it (``local=False``: no LCM;
    ``cpe=False``: no CPE). The bare module (``al.build("l2vit")``) is the linear attention
    alone. The LCM's BatchNorm makes a sequence's output depend on the other sequences of
    the batch in training mode (batch statistics over their real tokens, as in the paper);
    in eval mode it uses its running statistics and sequences are independent. The paper
    alternates these blocks with local 7 x 7 window attention — a model-level choice
    (``TransformerLM`` / ``ViT`` take a mechanism per layer).
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "local": Arg("bool"),
        "cpe": Arg("bool"),
        "lcm": Arg("bool", optional=True),
    }

    def __init__(self, dim: int, heads: int, *, local: bool = True, cpe: bool = True,
                 lcm: bool | None = None, **kwargs) -> None:
        local = deprecated_alias("l2vit", "lcm", lcm, "local", local, True)
        kwargs.setdefault("bias", True)  # the official qkv (qkv_bias=True) and proj
        super().__init__(dim, heads, **kwargs)
        self.tau = nn.Parameter(torch.empty(self.heads))
        with torch.no_grad():
            self._reset_own()
        self.local, self.cpe = local, cpe

    def _reset_own(self) -> None:
        self.tau.fill_(self.head_dim ** -0.5)  # the temperature starts at 1 / sqrt(d)

    def residual_branches(self) -> dict[str, nn.Module]:
        """New modules for the block around this attention: ``"before"`` (the CPE, added
        ahead of the attention branch) and ``"after"`` (the LCM branch, added after it);
        each maps the block's running input x to what is added to it."""
        branches: dict[str, nn.Module] = {}
        if self.cpe:
            branches["before"] = ConditionalPosition(self.dim)
        if self.local:
            branches["after"] = ConcentrationBranch(self.dim)
        return branches

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
