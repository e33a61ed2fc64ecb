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
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any


class ArgumentError(ValueError, TypeError):
    """A constructor argument of the wrong type or out of range (a ``ValueError`` and a
    ``TypeError``: code that catches either one keeps working)."""


@dataclass(frozen=True)
class Arg:
    """One argument: ``kind`` "int", "float", "bool" or "str"; or, for per-axis settings,
    "ints" (a non-empty tuple or list of ints, each in the range; ``length``: exactly that
    many), "int_or_ints" (an int or such a tuple) and "bools" (a non-empty tuple or list of
    bools). ``optional``: None allowed; ``low`` / ``high``: bounds of a number (``low_open``
    / ``high_open``: excluded); ``choices``: the accepted strings; ``rule`` and ``test``: a
    further condition on one value (an int or each element), in words and as a predicate
    ("a square number")."""

    kind: str
    optional: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    length: int | None = None
    rule: str | None = None
    test: Callable[[Any], bool] | None = None

    def accepted(self) -> str:
        """What the argument accepts, in words: 'an int >= 1 or None'."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "bool":
            return "True, False or None" if self.optional else "True or False"
        else:
            text = {"int": "an int", "float": "a finite number", "str": "a string",
                    "ints": "a non-empty tuple of ints", "bools": "a non-empty tuple of bools",
                    "int_or_ints": "an int or a non-empty tuple of ints"}[self.kind]
            if self.length is not None:
                text = text.replace("a non-empty tuple of", f"a tuple of {self.length}")
            if self.kind in ("ints", "int_or_ints") and self.low is not None:
                text += ", each"
            if self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            if self.high is not None:
                text += f"{' and' if self.low is not None else ''} " \
                        f"{'<' if self.high_open else '<='} {_num(self.high)}"
        if self.rule is not None:
            text += f"{',' if self.low is not None else ''} {self.rule}"
        return text + (" or None" if self.optional else "")

    def fits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if self.kind in ("ints", "int_or_ints", "bools"):
            if self.kind == "int_or_ints" and not isinstance(value, (tuple, list)):
                return self._fits_one(value, "int")
            if not isinstance(value, (tuple, list)) or not value or \
                    (self.length is not None and len(value) != self.length):
                return False
            return all(isinstance(v, bool) if self.kind == "bools" else self._fits_one(v, "int")
                       for v in value)
        return self._fits_one(value, self.kind)

    def _fits_one(self, value: Any, kind: str) -> bool:
        if isinstance(value, bool):  # True is an int to Python, never a count or a rate here
            return False
        if kind == "int":
            if not isinstance(value, numbers.Integral):
                return False
        elif not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open
                                      else value > self.high):
            return False
        return self.test is None or bool(self.test(value))


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


SQUARE = "a square number (7 x 7 = 49)"


def is_square(value: int) -> bool:
    """Whether ``value`` >= 0 is a square number (a grid of agents or landmarks)."""
    return value >= 0 and math.isqrt(value) ** 2 == value


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside attnlab (the user's line), for warnings."""
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
            _PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def deprecated_alias(owner: str, old: str, old_value: Any, new: str, new_value: Any,
                     new_default: Any) -> Any:
    """The value of argument ``new`` when its deprecated name ``old`` may be given too: warn
    (FutureWarning, at the user's line) when ``old`` is used, refuse ``old`` and ``new``
    given with different values (``new`` not at its default), else ``old``'s value."""
    if old_value is None:
        return new_value
    if new_value != new_default and new_value != old_value:
        raise ArgumentError(f"{owner}: {old}={old_value!r} (deprecated) contradicts "
                            f"{new}={new_value!r}; pass {new}= only")
    warnings.warn(f"{owner}: {old}= is deprecated, use {new}=", FutureWarning,
                  stacklevel=_caller_stacklevel())
    return old_value
