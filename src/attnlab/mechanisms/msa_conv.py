"""Multi-head self-attention convolution (TiC): attention inside a convolution window."""

from __future__ import annotations

from typing import ClassVar

from attnlab.core.arguments import Arg
from attnlab.core.call import Call
from attnlab.core.registry import register
from attnlab.mechanisms.neighborhood import NeighborhoodAttention, per_axis


@register("msa_conv", family="local", paper="TiC: Exploring Vision Transformer in Convolution",
          causal=False, bidirectional=True, decode=False, domains=("image", "seq"),
          complexity="n k^2 d", weights=True, cross=False,
          variants=({"kernel_size": 5, "dilation": 2}, {"kernel_size": 3, "heads_per_channel":
                                                       True}))
class MSAConvAttention(NeighborhoodAttention):
    """Self-attention restricted to each query's convolution window.

    "TiC: Exploring Vision Transformer in Convolution": the k x k window of a convolution
    (stride 1, zero padding, dilation d) centred on the query defines its keys,
    O_i = softmax_{j in W_k,d(i)}(c q_i.k_j) v_j, so the layer runs at any resolution like a
    convolution. The paper's window kinds map to arguments: standard (``dilation=1``),
    dilated (``dilation > 1``) and depthwise (one channel per head:
    ``heads_per_channel=True`` sets heads = dim with head_dim 1). Unlike neighborhood
    attention the window is cut, not shifted, at the borders (the neighborhood op with
    ``border="clip"``). A sequence is a 1-D window.
    """

    arguments: ClassVar[dict[str, Arg]] = {
        **NeighborhoodAttention.arguments,
        "heads_per_channel": Arg("bool"),
    }

    def __init__(self, dim: int, heads: int, *, kernel_size: int = 3, dilation: int = 1,
                 heads_per_channel: bool = False, **kwargs) -> None:
        if heads_per_channel:
            heads, kwargs["head_dim"] = dim, 1
            kwargs.pop("kv_heads", None)
        super().__init__(dim, heads, kernel_size=kernel_size, dilation=dilation, **kwargs)
        if any(s != 1 for s in per_axis(self.stride)) or any(self.causal_axes or ()):
            raise ValueError(f"msa_conv: convolution windows take neither a stride nor causal "
                             f"axes, got stride={self.stride!r}, "
                             f"causal_axes={self.causal_axes!r}")

    def _axes(self, call: Call, length: int) -> dict:
        # the op rejects a stride or causal axes together with convolution windows
        return super()._axes(call, length) | {"border": "clip"}
