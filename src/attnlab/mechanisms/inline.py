"""Injective linear attention (InLine) with its local module."""

from __future__ import annotations

from typing import ClassVar

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
    """Depthwise 3-tap (sequence) or 3x3 (image) conv on V whose kernel, one per head, is
    predicted from the mean token: kernel = W x_mean + b. Causal: the mean over x_{<=t} and
    taps t-2, t-1, t (an attnlab extension), with a fixed-size decode state."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.predict = nn.Linear(dim, heads * 9)
        nn.init.zeros_(self.predict.weight)
        nn.init.zeros_(self.predict.bias)

    def forward(self, v: Tensor, call: Call, causal: bool) -> Tensor:
        b, h, length, _ = v.shape
        keep = None if call.key_mask is None else call.key_mask[:, -length:]
        x = call.x if keep is None else call.x * keep[..., None].to(call.x.dtype)
        count = (x.new_ones(b, length) if keep is None else keep.to(x.dtype))
        if keep is not None:
            v = v * keep[:, None, :, None].to(v.dtype)
        if causal:
            return self._causal(v, x, count, call)
        mean = x.sum(1) / count.sum(1, keepdim=True).clamp_min(1.0)
        kernel = self.predict(mean).view(b, h, 3, 3).to(v.dtype)
        if call.spatial is not None and len(call.spatial) == 2:
            hh, ww = call.spatial
            img = F.pad(v.unflatten(2, (hh, ww)), (0, 0, 1, 1, 1, 1))
            out = sum(kernel[:, :, i, j, None, None, None] * img[:, :, i:i + hh, j:j + ww]
                      for i in range(3) for j in range(3))
            return out.flatten(2, 3)
        seq = F.pad(v, (0, 0, 1, 1))
        return sum(kernel[:, :, 1, j, None, None] * seq[:, :, j:j + length] for j in range(3))

    def _causal(self, v: Tensor, x: Tensor, count: Tensor, call: Call) -> Tensor:
        st = call.state
        x_sum = x.cumsum(1)
        n = count.cumsum(1)
        past = v.new_zeros(*v.shape[:2], 2, v.shape[-1])
        if st is not None and st.get("x_sum") is not None:
            x_sum = x_sum + st.get("x_sum")[:, None]
            n = n + st.get("n")[:, None]
            past = st.get("v_past")
        mean = x_sum / n.clamp_min(1.0)[..., None]
        kernel = self.predict(mean).view(*mean.shape[:2], self.heads, 3, 3)[..., 1, :]
        kernel = kernel.permute(0, 2, 1, 3).to(v.dtype)  # (B, H, L, 3): taps t-2, t-1, t
        seq = torch.cat([past, v], dim=2)
        length = v.shape[2]
        out = sum(kernel[..., j, None] * seq[:, :, j:j + length] for j in range(3))
        if st is not None:
            st.put(x_sum=x_sum[:, -1], n=n[:, -1], v_past=seq[:, :, -2:])
        return out


@register("inline", family="linear",
          paper="Bridging the Divide: Reconsidering Softmax and Linear Attention",
          causal=True, bidirectional=True, decode=True, domains=("image", "seq"),
          complexity="n d^2", weights=True, cross=False, weights_exact=False,
          variants=({"feature_map": "relu", "local": False}, {"feature_map": "exp"}),
          notes="Vision (bidirectional) in the paper; the causal prefix form and the causal "
                "local module (kernel from the prefix mean) are attnlab extensions.")
class InjectiveLinearAttention(LinearFamily):
    """InLine: injective linear attention plus a dynamic local module.

    "Bridging the Divide: Reconsidering Softmax and Linear Attention" (LeapLabTHU/InLine).
    Over the N_i visible keys,

        w_ij = (c / N_i) [phi(q_i).phi(k_j) - phi(q_i).mean_j phi(k_j)] + 1 / N_i,

    rows sum to 1 and weights may be negative; unlike plain linear attention the map is
    injective (q and 2q give different weights). phi: ``identity`` (default), ``relu``,
    ``leaky_relu``, ``exp`` (exp(0.2 x)). ``local=True`` adds the local module: a depthwise
    3x3 (image) / 3-tap (sequence) conv on V with a per-head kernel predicted from the mean
    token. The causal prefix form is an attnlab extension of the vision paper.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        "feature_map": Arg("str", choices=tuple(sorted(INLINE_MAPS))),
        "local": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, feature_map: str = "identity",
                 local: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.feature_map = feature_map
        self.local = DynamicLocal(dim, self.kv_heads) if local else None
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
