"""The mechanism registry: names, metadata, and construction by name.

Mechanisms register themselves when ``attnlab.mechanisms`` is imported, which importing
``attnlab`` does.

The metadata recorded here is the single source of truth for the tests (the conformance
suite iterates over :func:`available`), the docs, ``attnlab list`` and the README table.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnlab.core.arguments import check_arguments

if TYPE_CHECKING:  # pragma: no cover
    from attnlab.mechanisms.base import Attention

COMMON_OPTIONS = ("kv_heads", "qk_norm", "rope", "gate")
# Constructor arguments of the base class that a mechanism passes to choose its parts: not
# user options of ``build`` and not shown as defaults.
PART_ARGUMENTS = ("projection", "qk_dim", "output_projection", "output_norm", "rotary")


@dataclass(frozen=True)
class MechanismInfo:
    """What a registered mechanism is and what it can serve.

    ``causal`` / ``bidirectional``: which masking modes it supports. ``decode``: it can
    run token by token with a state. ``weights``: ``Attention.weights`` is defined.
    ``weights_exact``: the output is exactly ``weights @ values`` (so the conformance suite
    can check one against the other). ``cross``: it accepts ``context=``.
    ``unsupported``: common constructor options (``COMMON_OPTIONS``) it rejects.
    ``variants``: extra keyword sets the conformance suite also runs.
    """

    name: str
    cls: type
    family: str
    paper: str
    causal: bool
    bidirectional: bool
    decode: bool
    domains: tuple[str, ...]
    complexity: str
    weights: bool
    cross: bool
    weights_exact: bool = True
    unsupported: tuple[str, ...] = ()
    variants: tuple[dict[str, Any], ...] = ()
    notes: str = ""
    doc: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def modes(self) -> str:
        """Human-readable list of supported masking modes."""
        return " and ".join(m for m, ok in (("causal", self.causal),
                                            ("bidirectional", self.bidirectional)) if ok)


_REGISTRY: dict[str, MechanismInfo] = {}


def _first_doc_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _own_defaults(cls: type) -> dict[str, Any]:
    """Constructor defaults, i.e. what ``build(name, dim=..., heads=...)`` uses."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    internal = _part_arguments(params)
    return {
        n: p.default
        for n, p in params.items()
        if n not in ("self", "dim", "heads", *internal)
        and p.default is not inspect.Parameter.empty
        and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def register(
    name: str,
    *,
    family: str,
    paper: str,
    causal: bool,
    bidirectional: bool,
    decode: bool,
    domains: tuple[str, ...] = ("seq",),
    complexity: str,
    weights: bool = True,
    cross: bool = False,
    weights_exact: bool = True,
    unsupported: tuple[str, ...] = (),
    variants: tuple[dict[str, Any], ...] = (),
    notes: str = "",
) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator that registers an :class:`attnlab.Attention` subclass by name."""
    if not (causal or bidirectional):
        raise ValueError(f"mechanism {name!r} must support causal or bidirectional attention")
    bad = set(unsupported) - set(COMMON_OPTIONS)
    if bad:
        raise ValueError(f"unsupported= names unknown common options {sorted(bad)}")

    def decorate(cls: type[Attention]) -> type[Attention]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"mechanism name {name!r} is already registered by {existing.cls.__qualname__}"
            )
        info = MechanismInfo(
            name=name, cls=cls, family=family, paper=paper, causal=causal,
            bidirectional=bidirectional, decode=decode, domains=tuple(sorted(domains)),
            complexity=complexity, weights=weights, cross=cross, weights_exact=weights_exact,
            unsupported=tuple(unsupported), variants=tuple(variants), notes=notes,
            doc=_first_doc_line(cls), defaults=_own_defaults(cls),
        )
        cls.mechanism = info
        _check_own_arguments(cls)
        _REGISTRY[name] = info
        return cls

    return decorate


def _check_own_arguments(cls: type) -> None:
    """Make the constructor check the mechanism's own declared arguments (``arguments``:
    ``{name: Arg}``, attnlab.core.arguments) before it runs, so that ``build`` and direct
    construction (``attnlab.mechanisms.X(...)``) refuse a bad value in the same words: the
    mechanism, the argument, the value and what is accepted. The common arguments are
    checked by the base class."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_checks_arguments", False):
        return

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        info = type(self).mechanism
        check_arguments(info.name if info is not None else cls.__name__,
                        getattr(cls, "arguments", {}), kwargs)
        init(self, *args, **kwargs)

    checked_init._checks_arguments = True  # type: ignore[attr-defined]
    cls.__init__ = checked_init  # type: ignore[misc]


def available(*, family: str | None = None, domain: str | None = None) -> list[str]:
    """Sorted names of the registered mechanisms, optionally filtered; an unknown family or
    domain is a ValueError that lists the known ones."""
    for what, value, known in (("family", family, {i.family for i in _REGISTRY.values()}),
                               ("domain", domain,
                                {d for i in _REGISTRY.values() for d in i.domains})):
        if value is not None and value not in known:
            raise ValueError(f"unknown {what} {value!r}; known: {', '.join(sorted(known))}")
    return sorted(
        n for n, i in _REGISTRY.items()
        if (family is None or i.family == family) and (domain is None or domain in i.domains)
    )


def info(name: str) -> MechanismInfo:
    """Metadata of a registered mechanism; unknown names raise ``ValueError`` with suggestions."""
    if not isinstance(name, str):
        raise ValueError(f"a mechanism name is a string, got {name!r}; available: "
                         f"{', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown attention mechanism {name!r}.{hint} "
            f"Available: {', '.join(sorted(_REGISTRY))}."
        ) from None


def build(name: str, dim: int, heads: int, **kwargs: Any) -> Attention:
    """Construct a registered mechanism: ``build("sigmoid", dim=256, heads=8, causal=True)``."""
    cls = info(name).cls
    accepted = _accepted_arguments(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{name!r} got unknown argument(s) {unknown}; it accepts: {', '.join(sorted(accepted))}"
        )
    return cls(dim=dim, heads=heads, **kwargs)


def _accepted_arguments(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        internal = _part_arguments(params)
        names |= {n for n, p in params.items() if n != "self" and n not in internal
                  and p.kind not in (inspect.Parameter.VAR_KEYWORD,
                                     inspect.Parameter.VAR_POSITIONAL)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return names


def _part_arguments(params) -> tuple[str, ...]:
    """The base class's part arguments when ``params`` is its signature (a mechanism may
    offer an option of the same name, e.g. SHViT's ``qk_dim``)."""
    return PART_ARGUMENTS if "projection" in params else ()
