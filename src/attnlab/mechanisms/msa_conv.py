"""Multi-head self-attention convolution (TiC): attention inside a convolution window."""

from __future__ import annotations

from torch import Tensor

from attnlab.core.base import Attention, Call
from attnlab.core.registry import register
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_visibility
from attnlab.ops.softmax import softmax_weights


@register("msa_conv", family="local", paper="TiC: Exploring Vision Transformer in Convolution",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n k^2 d", weights=True, cross=False,
          variants=({"kernel_size": 5, "dilation": 2}, {"kernel_size": 3, "heads_per_channel":
                                                       True}))
class MSAConvAttention(Attention):
    """Self-attention restricted to each query's convolution window.

    "TiC: Exploring Vision Transformer in Convolution": the k x k window of a convolution
    (stride 1, zero padding, dilation d) centred on the query defines its keys,
    O_i = softmax_{j in W_k,d(i)}(c q_i.k_j) v_j, so the layer runs at any resolution like a
    convolution. The paper's window kinds map to arguments: standard (``dilation=1``),
    dilated (``dilation > 1``) and depthwise (one channel per head:
    ``heads_per_channel=True`` sets heads = dim with head_dim 1). Unlike neighborhood
    attention the window is cut, not shifted, at the borders. A sequence is a 1-D window.
    """

    backends = ("auto", "reference", "tiled", "flex")

    def __init__(self, dim: int, heads: int, *, kernel_size: int = 3, dilation: int = 1,
                 heads_per_channel: bool = False, **kwargs) -> None:
        if heads_per_channel:
            heads, kwargs["head_dim"] = dim, 1
            kwargs.pop("kv_heads", None)
        super().__init__(dim, heads, **kwargs)
        if kernel_size < 1 or dilation < 1:
            raise ValueError(f"msa_conv: kernel_size and dilation must be >= 1, got "
                             f"{kernel_size}, {dilation}")
        self.kernel_size, self.dilation = kernel_size, dilation

    def _window(self, call: Call, length: int) -> dict:
        spatial = call.spatial or (length,)
        return dict(kernel_size=self.kernel_size, dilation=self.dilation, border="clip",
                    spatial=spatial)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: Call) -> Tensor:
        window = self._window(call, q.shape[2])
        spatial = window.pop("spatial")
        b = q.shape[0]
        out = neighborhood_attention(
            q.reshape(b, q.shape[1], *spatial, -1), k.reshape(b, k.shape[1], *spatial, -1),
            v.reshape(b, v.shape[1], *spatial, -1), **window, key_mask=call.key_mask,
            backend=self.backend)
        return out.reshape(b, q.shape[1], -1, v.shape[-1])

    def attention_weights(self, q: Tensor, k: Tensor, call: Call) -> Tensor:
        window = self._window(call, q.shape[2])
        vis = neighborhood_visibility(window.pop("spatial"), **window, device=q.device)[None,
                                                                                         None]
        if call.key_mask is not None:
            vis = vis & call.key_mask[:, None, None, :]
        return softmax_weights(q, self.expand_kv(k), vis, scale=q.shape[-1] ** -0.5)
