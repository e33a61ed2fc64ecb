"""Built-in mechanisms; importing this package registers all of them.

Every module of this package is imported here, so a new mechanism needs no line in this file:
its ``@register`` runs on import. Each registered class is also an attribute of the package
(``attnlab.mechanisms.SoftmaxAttention``).
"""

from __future__ import annotations

import importlib
import pkgutil

from attnlab.core.registry import available, info

_NOT_MECHANISMS = {"base"}

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_MECHANISMS:
        importlib.import_module(f"{__name__}.{_module}")

_BUILT_IN = {c.__name__: c for c in (info(name).cls for name in available())
             if c.__module__.startswith(f"{__name__}.")}
globals().update(_BUILT_IN)
__all__ = sorted(_BUILT_IN)
