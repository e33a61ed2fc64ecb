"""The one backend dispatcher of the ops: which backend serves a call, and why the others not.

Every op lists its backends in order of preference for ``backend="auto"`` (the dense
``reference`` last). For a call, each backend is asked whether it can serve it; ``auto``
takes the first that can, a named backend that cannot raises ``ValueError`` with the
reason. The reasons go to the ``attnlab.ops`` logger at DEBUG level, and :func:`explain`
returns them (``attnlab info`` prints them)::

    >>> explain("sigmoid_attention", q, k, v)
    [('flex', 'skipped: auto uses FlexAttention on CUDA only ...'), ('tiled', 'chosen'), ...]
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger("attnlab.ops")

FLEX_MIN_HEAD_DIM = 16  # FlexAttention's compiled kernels need q/k and v head dims >= 16


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (grad mode on and one of
    them requires grad): the backends' and the tiled paths' one test of "training"."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class Request:
    """What a backend needs to know about one op call."""

    op: str
    q: Tensor
    k: Tensor
    v: Tensor
    tensor_bias: bool = False  # a tensor added to the scores (not a float)

    @property
    def grad(self) -> bool:
        return needs_grad(self.q, self.k, self.v)

    @property
    def device(self) -> str:
        return self.q.device.type


_flex_found: list[bool] = []  # the answer, once known (no functools.cache: torch.compile
# warns that it traces through such a cache)


def flex_available() -> bool:
    """Whether this torch build has FlexAttention (looked up once)."""
    if not _flex_found:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:  # pragma: no cover - torch < 2.5
            _flex_found.append(False)
        else:
            _flex_found.append(True)
    return _flex_found[0]


def why_not(backend: str, request: Request, *, auto: bool) -> str | None:
    """None when ``backend`` can serve ``request``, otherwise the reason it cannot."""
    if backend in ("reference", "sdpa"):
        return None
    if backend == "tiled":
        return "the tiled backend takes a float bias only" if request.tensor_bias else None
    if backend == "flex":
        if not flex_available():
            return "FlexAttention is not available in this torch build"
        if auto and request.device != "cuda":
            return (f"auto uses FlexAttention on CUDA only (on {request.device} it runs "
                    "eagerly, unfused)")
        if request.grad and request.device == "cpu":
            return "FlexAttention has no backward on CPU; use backend='tiled'"
        if request.tensor_bias:
            return "the flex backend takes a float bias only"
        e, ev = request.q.shape[-1], request.v.shape[-1]
        if request.device == "cuda" and min(e, ev) < FLEX_MIN_HEAD_DIM:
            return (f"compiled FlexAttention needs head dims >= {FLEX_MIN_HEAD_DIM}, got "
                    f"q/k {e} and v {ev}")
        return None
    if backend == "triton":
        from attnlab.ops import triton as kernels  # the package; triton itself not imported

        return kernels.why_not(request.device, auto=auto)
    return None  # an op-specific backend with no general limits (e.g. lla's "chunked")


Limits = Callable[[str], "str | None"]  # an op's own conditions: backend -> reason or None


def explain(op: str, backend: str, backends: tuple[str, ...], q: Tensor, k: Tensor,
            v: Tensor, *, tensor_bias: bool = False,
            limits: Limits | None = None) -> list[tuple[str, str]]:
    """``(backend, verdict)`` for each backend of ``op``: "chosen", "not tried" or
    "skipped: <reason>" (``auto``); a named backend is "chosen" or "refused: <reason>".

    ``limits(name)`` adds the op's own conditions (e.g. linear attention's chunked form takes
    key padding only) to the general ones of :func:`why_not`.
    """
    if backend not in ("auto", *backends):
        raise ValueError(f"{op}: unknown backend {backend!r}; choose from "
                         f"{('auto', *backends)}")
    request = Request(op, q, k, v, tensor_bias)

    def reason_for(name: str, auto: bool) -> str | None:
        general = why_not(name, request, auto=auto)
        return general if general is not None or limits is None else limits(name)

    if backend != "auto":
        reason = reason_for(backend, False)
        return [(backend, "chosen" if reason is None else f"refused: {reason}")]
    verdicts, chosen = [], None
    for name in backends:
        if chosen is not None:
            verdicts.append((name, "not tried"))
            continue
        reason = reason_for(name, True)
        if reason is None:
            chosen = name
            verdicts.append((name, "chosen"))
        else:
            verdicts.append((name, f"skipped: {reason}"))
    return verdicts


_recordings: list[list] = []


@contextlib.contextmanager
def recorded() -> Iterator[list[tuple[str, list[tuple[str, str]]]]]:
    """Collect ``(op, verdicts)`` of every backend choice made inside the block (what
    ``attnlab info`` shows for one forward and backward of a mechanism)."""
    recording: list = []
    _recordings.append(recording)
    try:
        yield recording
    finally:
        _recordings.remove(recording)


def choose(op: str, backend: str, backends: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor,
           *, tensor_bias: bool = False, limits: Limits | None = None) -> str:
    """The backend that serves this call. ``backends`` is the op's preference order for
    ``auto``; a named backend that cannot serve the call raises ``ValueError``."""
    verdicts = explain(op, backend, backends, q, k, v, tensor_bias=tensor_bias, limits=limits)
    for recording in _recordings:
        recording.append((op, verdicts))
    for name, verdict in verdicts:
        if verdict == "chosen":
            # no logging while torch.compile / torch.export trace the call (a logger call
            # broke the graph); the choice is made at trace time, the same as eagerly
            if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s (%s)", op, name,
                          "; ".join(f"{n}: {w}" for n, w in verdicts if n != name) or "asked")
            return name
    name, verdict = verdicts[0]
    raise ValueError(f"{op}: backend {name!r} {verdict}")
