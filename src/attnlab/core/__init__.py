"""The contract: base module, registry and metadata, masks, states, hook points."""

from attnlab.core.base import Attention, Call
from attnlab.core.hooks import HookPoint
from attnlab.core.registry import MechanismInfo, available, build, info, register
from attnlab.core.state import KVCache, RecurrentState, State

__all__ = [
    "Attention", "Call", "HookPoint", "KVCache", "MechanismInfo", "RecurrentState", "State",
    "available", "build", "info", "register",
]
