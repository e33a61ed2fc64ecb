"""Injective linear attention (InLine) with its local module."""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.linear import LinearFamily
from attnlab.ops.common import row_counts, upcast
from attnlab.ops.linear import prefix_sums

INLINE_MAPS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "exp": lambda x: torch.exp(0.2 * x),
}


class DynamicLocal(nn.Module):
    """InLine's local module: a depthwise 3x3 convolution on V whose kernel, one per value
    channel, a two-layer MLP predicts from the mean token m (B, C):

        K = W2 GELU(W1 m + b1) + b2,    K (B, channels, 3, 3)

    W1 (C -> C) and W2 (C -> 9 channels) are block-diagonal over ``groups`` (the heads): 1x1
    grouped convolutions with PyTorch's default init, as in the official module. On a
    sequence the middle row gives 3 taps. Causal (an attnlab extension): the mean of
    x_{<=t} and taps t-2, t-1, t, with a fixed-size decode state."""

    def __init__(self, dim: int, channels: int, groups: int) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = nn.Conv1d(dim, dim, 1, groups=groups)
        self.kernel = nn.Conv1d(dim, 9 * channels, 1, groups=groups)

    def kernels(self, mean: Tensor) -> Tensor:
        """(..., C) mean tokens -> (..., channels, 3, 3) kernels."""
        flat = mean.reshape(-1, mean.shape[-1], 1)
        out = self.kernel(F.gelu(self.hidden(flat)))
        return out.view(*mean.shape[:-1], self.channels, 3, 3)

    def forward(self, v: Tensor, call: Call, causal: bool) -> Tensor:
        b, h, length, d = v.shape
        keep = None if call.key_mask is None else call.key_mask[:, -length:]
        x = call.x if keep is None else call.x * keep[..., None].to(call.x.dtype)
        count = (x.new_ones(b, length) if keep is None else keep.to(x.dtype))
        if keep is not None:
            v = v * keep[:, None, :, None].to(v.dtype)
        if causal:
            return self._causal(v, x, count, call)
        mean = x.sum(1) / count.sum(1, keepdim=True).clamp_min(1.0)
        kernel = self.kernels(mean).view(b, h, d, 3, 3).to(v.dtype)
        if call.spatial is not None and len(call.spatial) == 2:
            return _conv_image(v, kernel, call.spatial)
        seq = F.pad(v, (0, 0, 1, 1))
        return cast(Tensor, sum(kernel[:, :, None, :, 1, j] * seq[:, :, j:j + length]
                                for j in range(3)))

    def _causal(self, v: Tensor, x: Tensor, count: Tensor, call: Call) -> Tensor:
        st = call.state
        x_sum = x.cumsum(1)
        n = count.cumsum(1)
        past = v.new_zeros(*v.shape[:2], 2, v.shape[-1])
        if st is not None and st.get("x_sum") is not None:
            x_sum = x_sum + cast(Tensor, st.get("x_sum"))[:, None]
            n = n + cast(Tensor, st.get("n"))[:, None]  # put with x_sum
            past = cast(Tensor, st.get("v_past"))
        mean = x_sum / n.clamp_min(1.0)[..., None]
        b, h, length, d = v.shape
        kernel = self.kernels(mean)[..., 1, :].view(b, length, h, d, 3)
        kernel = kernel.transpose(1, 2).to(v.dtype)  # (B, H, L, D, 3): taps t-2, t-1, t
        seq = torch.cat([past, v], dim=2)
        out = cast(Tensor, sum(kernel[..., j] * seq[:, :, j:j + length] for j in range(3)))
        if st is not None:
            st.put(x_sum=x_sum[:, -1], n=n[:, -1], v_past=seq[:, :, -2:])
        return out


def _conv_image(v: Tensor, kernel: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Depthwise 3x3 cross-correlation with zero padding 1 of v (B, H, L, D) on its (hh, ww)
    grid, one kernel (B, H, D, 3, 3) per channel."""
    hh, ww = spatial
    img = F.pad(v.unflatten(2, (hh, ww)), (0, 0, 1, 1, 1, 1))  # (B, H, hh + 2, ww + 2, D)
    out = cast(Tensor, sum(kernel[:, :, None, None, :, i, j] * img[:, :, i:i + hh, j:j + ww]
                           for i in range(3) for j in range(3)))
    return out.flatten(2, 3)


@register("inline", family="linear",
          paper="Bridging the Divide: Reconsidering Softmax and Linear Attention",
          causal=True, bidirectional=True, decode=True, domains=("image", "seq"),
          complexity="n d^2", weights=True, cross=False, weights_exact=False,
          variants=({"feature_map": "relu", "local": False}, {"feature_map": "exp"}),
          notes="Vision (bidirectional) in the paper; the causal prefix form and the causal "
                "local module (kernel from the prefix mean) are attnlab extensions.")
class InjectiveLinearAttention(LinearFamily):
    """InLine: injective linear attention plus a dynamic local module.

    "Bridging the Divide: Reconsidering Softmax and Linear Attention" (Han et al.; official
    LeapLabTHU/InLine ``InLineAttention``). Over the N_i visible keys, c = d^-1/2,

        w_ij = (c / N_i) [phi(q_i).phi(k_j) - phi(q_i).mean_j phi(k_j)] + 1 / N_i,
        y_i  = sum_j w_ij v_j + (K(mean x) * V)_i,

    rows of w sum to 1 and weights may be negative; unlike plain linear attention the map is
    injective (q and 2q give different weights). phi: ``identity`` (default), ``relu``,
    ``leaky_relu``, ``exp`` (exp(0.2 x)). The local module (``local=True``, default): a
    depthwise 3x3 (image) / 3-tap (sequence) convolution on V with one kernel per channel,
    predicted from the mean token by a per-head two-layer MLP (1x1 grouped convs, GELU);
    ``local=False`` drops it. ``bias=True`` by default (the official qkv and output
    projections have biases). The causal prefix form is an attnlab extension.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "feature_map": Arg("str", choices=tuple(sorted(INLINE_MAPS))),
        "local": Arg("bool"),
        "bias": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, feature_map: str = "identity",
                 local: bool = True, bias: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, bias=bias, **kwargs)
        self.feature_map = feature_map
        channels = self.kv_heads * self.head_dim
        self.local = (DynamicLocal(dim, channels, math.gcd(dim, self.kv_heads)) if local
                      else None)
        self.weights_reproduce_output = not local  # weights() covers the attention, not the conv

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        phi = INLINE_MAPS[self.feature_map]
        q, k = upcast(q, k)  # exp(0.2 x) overflows float16 from x = 56
        a, d, vsum, n, new = prefix_sums(phi(q), phi(k), v, causal=self.causal,
                                         mask=call.op_mask, state=self.read_prefix(call))
        self.write_prefix(call, new)
        c = q.shape[-1] ** -0.5
        n = n.clamp_min(1.0).unsqueeze(-1)
        out = c / n * (a - d.unsqueeze(-1) * vsum / n) + vsum / n
        return out.to(v.dtype)  # the sums are float32 at least

    def local_term(self, v: Tensor, call: Call) -> Tensor | None:
        return None if self.local is None else self.expand_kv(self.local(v, call, self.causal))

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        s, vis = self.kernel_scores(INLINE_MAPS[self.feature_map], q, k, call)
        n = row_counts(vis, s).clamp_min(1.0)
        c = q.shape[-1] ** -0.5
        w = c / n * (s - s.sum(-1, keepdim=True) / n) + 1 / n
        return w if vis is None else w.masked_fill(~vis, 0.0)
