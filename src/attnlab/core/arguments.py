"""Declared constructor arguments: each one's type and range, checked in one place.

A mechanism's arguments are declared as ``{name: Arg(...)}`` and checked with
:func:`check_arguments` when the module is built, so that a wrong value fails there with a
message naming the mechanism, the argument, the value given and what is accepted, instead of
deep inside torch at the first forward (``head_dim=0``: ZeroDivisionError) or, worse, not at
all (``causal="false"`` is a true string: a causal module).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


class ArgumentError(ValueError, TypeError):
    """A constructor argument of the wrong type or out of range (a ``ValueError`` and a
    ``TypeError``: code that catches either one keeps working)."""


@dataclass(frozen=True)
class Arg:
    """One argument: ``kind`` "int", "float", "bool" or "str"; ``optional``: None allowed;
    ``low`` / ``high``: bounds of a number (``low_open`` / ``high_open``: excluded);
    ``choices``: the accepted strings."""

    kind: str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def accepted(self) -> str:
        """What the argument accepts, in words: 'an int >= 1 or None'."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "bool":
            return "True, False or None" if self.optional else "True or False"
        else:
            text = {"int": "an int", "float": "a finite number", "str": "a string"}[self.kind]
            if self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            if self.high is not None:
                text += f"{' and' if self.low is not None else ''} " \
                        f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return text + (" or None" if self.optional else "")

    def fits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if isinstance(value, bool):  # True is an int to Python, never a count or a rate here
            return False
        if self.kind == "int":
            if not isinstance(value, numbers.Integral):
                return False
        elif not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open
                                     else value <= self.high)


def check_arguments(owner: str, declared: dict[str, Arg], given: dict[str, Any]) -> None:
    """Raise :class:`ArgumentError` for the first of ``given`` that its declaration refuses:
    '<owner>: causal must be True, False or None, got 'false' (str)'."""
    for name, value in given.items():
        arg = declared.get(name)
        if arg is not None and not arg.fits(value):
            raise ArgumentError(f"{owner}: {name} must be {arg.accepted()}, got {value!r} "
                                f"({type(value).__name__})")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
