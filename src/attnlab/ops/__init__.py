"""Pure attention ops on (B, H, L, D) tensors, each with a dense ``reference`` backend."""

from attnlab.ops.decode import decode_attention
from attnlab.ops.linear import linear_attention
from attnlab.ops.lla import local_linear_attention
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_visibility
from attnlab.ops.rfa import random_feature_attention
from attnlab.ops.sigmoid import sigmoid_attention, sigmoid_weights
from attnlab.ops.softmax import softmax_attention, softmax_weights
from attnlab.ops.softplus import softplus_attention, softplus_weights

__all__ = [
    "decode_attention",
    "linear_attention",
    "local_linear_attention",
    "neighborhood_attention",
    "neighborhood_visibility",
    "random_feature_attention",
    "sigmoid_attention",
    "sigmoid_weights",
    "softmax_attention",
    "softmax_weights",
    "softplus_attention",
    "softplus_weights",
]
