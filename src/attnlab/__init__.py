"""attnlab: the multi-head attention design space behind one interface.

>>> import attnlab as al
>>> attn = al.build("sigmoid", dim=64, heads=4, causal=True)
"""

from attnlab import mechanisms as mechanisms  # registers the built-in mechanisms
from attnlab import ops as ops
from attnlab.core import (
    Call,
    HeadShape,
    HookPoint,
    MechanismInfo,
    State,
    available,
    build,
    info,
    register,
)
from attnlab.mechanisms.base import Attention

__version__ = "0.1.0"

__all__ = ["Attention", "Call", "HeadShape", "HookPoint", "MechanismInfo", "State", "available",
           "build", "info", "ops", "register", "__version__"]
