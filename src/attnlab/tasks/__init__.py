"""Arena tasks: seeded generators, metrics, slices and closed-form baselines.

``make_task(name, **params)`` builds one; ``TASKS`` maps every name to its class. Every
module of this package is imported here, so a new task (a ``@register_task`` class in a new
module) needs no line in this file.
"""

import importlib
import pkgutil

from attnlab.tasks.base import TASKS, Evaluation, Task, make_task, split_generator

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["TASKS", "Evaluation", "Task", "make_task", "split_generator"]
