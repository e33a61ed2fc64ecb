"""attnlab: the multi-head attention design space behind one interface.

>>> import attnlab as al
>>> attn = al.build("sigmoid", dim=64, heads=4, causal=True)

The names below are imported on first use (PEP 562), so that ``import attnlab`` and the
``attnlab`` command's help do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_FROM_CORE = ("Call", "HeadShape", "HookPoint", "MechanismInfo", "State", "available",
              "build", "info", "register")
__all__ = ["Attention", "Call", "HeadShape", "HookPoint", "MechanismInfo", "State", "available",
           "build", "info", "ops", "register", "__version__"]

if TYPE_CHECKING:
    from attnlab import mechanisms as mechanisms
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


def __getattr__(name: str) -> Any:
    if name in ("mechanisms", "ops"):
        return importlib.import_module(f"attnlab.{name}")
    if name == "Attention" or name in _FROM_CORE:
        importlib.import_module("attnlab.mechanisms")  # registers the built-in mechanisms
        if name == "Attention":
            from attnlab.mechanisms.base import Attention
            value: Any = Attention
        else:
            value = getattr(importlib.import_module("attnlab.core"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, "mechanisms"])
