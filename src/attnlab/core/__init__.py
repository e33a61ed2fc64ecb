"""The contract: base module, registry and metadata, masks, states, hook points."""

from attnlab.core.base import Attention, Call
from attnlab.core.hooks import HookPoint
from attnlab.core.registry import MechanismInfo, available, build, info, register
from attnlab.core.state import KVCache, State

__all__ = ["Attention", "Call", "HookPoint", "KVCache", "MechanismInfo", "State", "available",
           "build", "info", "register"]
