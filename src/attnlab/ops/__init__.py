"""Pure attention ops on (B, H, L, D) tensors, each with a dense ``reference`` backend.

One API: ``op(q, k, v, *, causal=False, mask=None, scale=None, backend="auto", ...)`` and,
for the ops that define a matrix, ``op_weights(q, k, *, causal=False, mask=None, scale=None,
...)`` with the same arguments (GQA keys included); ``op_weights(...) @ v`` is the op's
reference backend. The backend is chosen in ``attnlab.ops.dispatch``.
"""

from attnlab.ops.decode import decode_attention
from attnlab.ops.linear import linear_attention
from attnlab.ops.lla import lla_weights, local_linear_attention
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_visibility
from attnlab.ops.rfa import random_feature_attention, random_feature_weights
from attnlab.ops.sigmoid import sigmoid_attention, sigmoid_weights
from attnlab.ops.softmax import softmax_attention, softmax_weights
from attnlab.ops.softplus import softplus_attention, softplus_weights

__all__ = [
    "decode_attention",
    "linear_attention",
    "lla_weights",
    "local_linear_attention",
    "neighborhood_attention",
    "neighborhood_visibility",
    "random_feature_attention",
    "random_feature_weights",
    "sigmoid_attention",
    "sigmoid_weights",
    "softmax_attention",
    "softmax_weights",
    "softplus_attention",
    "softplus_weights",
]
