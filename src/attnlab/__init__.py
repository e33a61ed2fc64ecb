"""attnlab: the multi-head attention design space behind one interface.

>>> import attnlab as al
>>> attn = al.build("sigmoid", dim=64, heads=4, causal=True)
"""

from attnlab import mechanisms as mechanisms  # registers the built-in mechanisms
from attnlab import ops as ops
from attnlab.core import (
    Attention,
    Call,
    HookPoint,
    KVCache,
    MechanismInfo,
    State,
    available,
    build,
    info,
    register,
)

__version__ = "0.1.0"

__all__ = ["Attention", "Call", "HookPoint", "KVCache", "MechanismInfo", "State", "available",
           "build", "info", "ops", "register", "__version__"]
