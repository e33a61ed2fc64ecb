"""The contract's types: the call, the head shape, the decoding state, masks, hook points,
the registry and its metadata. The base module that wires parts into the contract is
``attnlab.mechanisms.base.Attention``."""

from attnlab.core.call import Call, HeadShape
from attnlab.core.hooks import HookPoint
from attnlab.core.registry import MechanismInfo, available, build, info, register
from attnlab.core.state import State

__all__ = ["Call", "HeadShape", "HookPoint", "MechanismInfo", "State", "available", "build",
           "info", "register"]
