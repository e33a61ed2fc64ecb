"""Built-in mechanisms; importing this package registers all of them."""

from attnlab.mechanisms.gated import GatedAttention
from attnlab.mechanisms.linear import LinearAttention
from attnlab.mechanisms.selective import SelectiveAttention
from attnlab.mechanisms.sigmoid import SigmoidAttention
from attnlab.mechanisms.softmax import SoftmaxAttention
from attnlab.mechanisms.softplus import SoftplusAttention

__all__ = [
    "GatedAttention", "LinearAttention", "SelectiveAttention", "SigmoidAttention",
    "SoftmaxAttention", "SoftplusAttention",
]
