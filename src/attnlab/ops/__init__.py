"""Pure attention ops on (B, H, L, D) tensors, each with a dense ``reference`` backend."""

from attnlab.ops.sigmoid import sigmoid_attention, sigmoid_weights
from attnlab.ops.softmax import softmax_attention, softmax_weights
from attnlab.ops.softplus import softplus_attention, softplus_weights

__all__ = [
    "sigmoid_attention", "sigmoid_weights", "softmax_attention", "softmax_weights",
    "softplus_attention", "softplus_weights",
]
