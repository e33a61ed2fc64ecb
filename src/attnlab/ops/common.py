"""Input checks and helpers shared by every op (tensors in (B, H, L, D) layout)."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from attnlab.core.arguments import Arg, check_arguments
from attnlab.core.masks import broadcasts, check_op_mask, rows_seeing, visibility
from attnlab.ops.dispatch import choose


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor | None, mask: Tensor | None) -> None:
    """Validate q (B, H, Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv) and the mask
    (``v=None``: a weights function, which has no values)."""
    named = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in named:
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor (B, H, L, D), got {shape}")
    if q.shape[0] != k.shape[0] or (v is not None and k.shape[:3] != v.shape[:3]):
        got = f"q {tuple(q.shape)}, k {tuple(k.shape)}"
        raise ValueError(f"{op}: shapes do not line up: {got}"
                         + (f", v {tuple(v.shape)}" if v is not None else ""))
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{op}: q and k need at least one head, got {q.shape[1]} query and "
                         f"{k.shape[1]} key heads")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if q.dtype != k.dtype or (v is not None and v.dtype != q.dtype):
        dtypes = (q.dtype, k.dtype) + ((v.dtype,) if v is not None else ())
        raise ValueError(f"{op}: q, k, v dtypes differ {dtypes}")
    if not q.is_floating_point():
        raise ValueError(f"{op}: q, k, v must be floating point, got {q.dtype}")
    check_op_mask(mask, q, k, op)


def check_op_bias(op: str, bias: object, q: Tensor, k: Tensor) -> None:
    """Validate an op's ``bias``: None, a number that is not NaN, or a floating tensor that
    broadcasts to (B, H, Lq, Lk) (a wrong shape failed inside torch's broadcasting)."""
    if bias is None:
        return
    if isinstance(bias, Tensor):
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if not bias.is_floating_point() or not broadcasts(bias, target):
            raise ValueError(f"{op}: a tensor bias must be floating point and broadcast to "
                             f"(B, H, Lq, Lk) = {target}, got {bias.dtype} "
                             f"{tuple(bias.shape)}")
        return
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or \
            bias == math.inf:  # -inf is meaningful: it hides every key (rows give 0)
        raise ValueError(f"{op}: bias must be a number below inf (not NaN), a tensor or "
                         f"None, got {bias!r}")


def begin_weights(op: str, q: Tensor, k: Tensor, *, causal: bool, mask: Tensor | None
                  ) -> tuple[Tensor, Tensor | None]:
    """Every weights function's preamble: check q, k and the mask, expand GQA heads.

    Returns ``k`` with as many heads as ``q`` and the bool visibility (.., Lq, Lk) that
    ``causal`` and ``mask`` imply (None: every key visible).
    """
    check_qkv(op, q, k, None, mask)
    vis = visibility(q.shape[2], k.shape[2], causal=causal, mask=mask, device=q.device)
    return expand_kv(k, q.shape[1]), vis


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under ``torch.autocast`` for the tensors' device, floating tensors in its dtype (the
    ops' own kernels then run on one dtype, as autocast's matmuls would); else unchanged."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def begin(op: str, backend: str, known: tuple[str, ...], q: Tensor, k: Tensor, v: Tensor,
          *, tensor_bias: bool = False) -> tuple[str, Tensor, Tensor, Tensor]:
    """The preamble of an op decorated with ``guarded_op`` (which has already cast to
    autocast's dtype and checked the inputs): resolve the backend (``known`` in order of
    preference for ``auto``, see ``ops/dispatch.py``), expand GQA heads.

    Returns the backend name, ``q``, and ``k``, ``v`` with as many heads as ``q``.
    """
    name = choose(op, backend, known, q, k, v, tensor_bias=tensor_bias)
    return name, q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])


def expand_kv(t: Tensor, heads: int) -> Tensor:
    """Repeat kv heads (GQA) so that (B, H_kv, L, D) lines up with ``heads`` query heads."""
    groups = heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in float32, or in the first one's dtype when that is wider (float64 stays
    float64): low-precision inputs are upcast for the score math (fp32 accumulation)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def unit_last_stride(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors with stride 1 along their last dim (a copy only where it is not): SDPA's
    fused CPU and CUDA kernels need it, and without it SDPA falls back to its math path,
    which holds the (Lq, Lk) scores of every head (a convolution's transposed output, e.g.
    cca's q and k, has the channels strided)."""
    return tuple(t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
                 for t in tensors)


def at_least_float32(t: Tensor) -> Tensor:
    """``upcast`` of one tensor."""
    return upcast(t)[0]


def row_counts(visible: Tensor | None, like: Tensor) -> Tensor:
    """Keys each row sees, (.., Lq, 1) in ``like``'s dtype: the visible ones, or all of them."""
    if visible is None:
        return like.new_full((1,) * like.dim(), float(like.shape[-1]))
    return visible.sum(-1, keepdim=True).to(like.dtype)


def shifted_exp(scores: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """exp(scores - max along ``dim``) and that max (kept); -inf scores (masked) give 0, and
    a row with none finite is shifted by 0 so that it stays 0 without NaN."""
    top = scores.amax(dim, keepdim=True)
    return torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0)), top


def zero_padded_keys(k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """k and v with the keys of a key-padding mask ((B, 1, 1, Lk): no row sees them) set to
    0, so that a huge finite padded key cannot overflow in an op's sums over keys (LLA's
    moments square it) before the mask removes it."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return k, v
    seen = mask[:, :, 0, :, None]  # (B or 1, 1, Lk, 1)
    return k.masked_fill(~seen, 0), v.masked_fill(~seen, 0)


def default_scale(q: Tensor, scale: float | None) -> float:
    """``scale``, or 1 / sqrt(D) when it is None; a scale that is no finite number, or a
    default for a head dim of 0, is a ValueError (nan gave different results per backend)."""
    if scale is None:
        if q.shape[-1] == 0:
            raise ValueError("q and k have head dim 0: there is no default scale 1/sqrt(D) "
                             "(pass scale=, or give them a head dim)")
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
            not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def visible_counts(lq: int, lk: int, *, causal: bool, mask: Tensor | None,
                   device: torch.device) -> Tensor:
    """Number of keys each query row sees, broadcastable to (B, H, Lq, 1)."""
    if mask is None:
        if not causal:
            return torch.full((1, 1, 1, 1), lk, device=device)
        return (torch.arange(lq, device=device) + (lk - lq) + 1).clamp(0, lk).view(1, 1, lq, 1)
    if mask.dim() == 4 and mask.shape[-2] == 1 and mask.shape[1] == 1 and causal:
        # key padding + causal: prefix sums of the key mask at each query's last visible key
        csum = mask[:, 0, 0].long().cumsum(-1)  # (B, Lk)
        last = torch.arange(lq, device=device) + (lk - lq)
        counts = torch.where(last >= 0, csum[:, last.clamp_min(0)], torch.zeros_like(csum[:, :1]))
        return counts.view(-1, 1, lq, 1)
    vis = visibility(lq, lk, causal=causal, mask=mask, device=device)
    assert vis is not None  # a mask or causal: not everything is visible
    return vis.sum(-1, keepdim=True)


Op = TypeVar("Op", bound=Callable)
Fn = TypeVar("Fn", bound=Callable)


def hide_nonfinite(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` and ``v`` with every key that holds a non-finite number (in k or v) set to 0,
    and those keys, bool (.., Lk). A hidden key (padding, a causal future) multiplied by a
    0 weight would still give NaN (0 x NaN); zeroed, it gives 0.

    Branch-free where a branch costs (issue 42): traced (``torch.compile``, ``torch.export``)
    and on accelerators the keys are confined with :func:`confine_keys` whatever they hold,
    without ``if bad.any()`` (which broke the graph, and on a GPU waits for the device).
    Eagerly on the CPU, where reading the flag is no device sync, clean keys skip the copy:
    for a decode step over a long cache the copy cost several times the step
    (``benchmarks/guard_overhead.py``). Both give the same numbers."""
    # one reduction per tensor (a key's sum is non-finite iff it holds inf or NaN, short of
    # an overflow near the dtype's max)
    bad = ~torch.isfinite(k.sum(-1) + v.sum(-1))
    if k.device.type == "cpu" and not tracing() and not bad.any():
        return k, v, bad
    return confine_keys(k, v, bad)


def confine_keys(k: Tensor, v: Tensor, bad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` and ``v`` with the keys ``bad`` (.., Lk) set to 0 (clean keys copied unchanged),
    and ``bad``: the branch-free half of :func:`hide_nonfinite`."""
    hide = bad.unsqueeze(-1)
    # torch.where, not masked_fill: with the (.., Lk, 1) mask broadcast over D, masked_fill
    # took ~3x as long on the CPU
    return torch.where(hide, 0.0, k), torch.where(hide, 0.0, v), bad


def tracing() -> bool:
    """Whether this call is being traced (``torch.compile``, ``torch.export``) rather than run
    eagerly: the ops then take their branch-free paths (no host sync, no logging)."""
    return torch.compiler.is_compiling()


def constant_geometry(fn: Fn) -> Fn:
    """Decorate a function of Python values (lengths, window rules, block sizes, a device)
    that builds index tensors with data-dependent steps (``int(t.max())``, boolean
    indexing): traced, it runs eagerly on real tensors outside the trace and its result
    enters the graph as a constant, so the graph does not break at those steps and
    ``torch.export`` does not meet a data-dependent size. Its arguments are guarded on
    (a new length recompiles); it must not read a traced tensor."""
    @functools.wraps(fn)
    def eager(*args, **kwargs):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        if not torch.compiler.is_compiling() or not _get_current_dispatch_mode_stack():
            return fn(*args, **kwargs)  # eagerly, or called by dynamo outside its fake mode
        # non-strict export runs this under fake and proxy modes: step out of both
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch._C._DisableTorchDispatch():
            return fn(*args, **kwargs)
    return torch.compiler.assume_constant_result(eager)


def nan_where(rows: Tensor, like: Tensor) -> Tensor:
    """NaN on the ``rows`` (.., L) bool, 0 elsewhere, (.., L, 1) in ``like``'s dtype: added to
    an output, it marks the rows that saw a non-finite input (and keeps its gradient NaN)."""
    return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(
        rows.unsqueeze(-1), float("nan"))


def _call_splitter(op: Callable) -> Callable[[tuple, dict], tuple[tuple, dict]]:
    """A function that turns a call of ``op`` into (positional arguments, keyword arguments)
    with at least q, k, v positional and the keyword-only options as keywords. A call that
    passes the leading parameters positionally and the options by keyword (the usual one) is
    returned as it is, without ``inspect.Signature.bind`` (~10 us, which counts in a decode
    step of ~0.1 ms); any other is bound (and so checked) by the signature."""
    signature = inspect.signature(op)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    leading = [p.name for p in signature.parameters.values() if p.kind in positional]
    leading_names = frozenset(leading)
    names = frozenset(signature.parameters)
    options = ", ".join(p.name for p in signature.parameters.values()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def split(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not names.issuperset(kwargs):  # named as the op, not as a helper it calls
            unknown = ", ".join(repr(k) for k in kwargs if k not in names)
            raise TypeError(f"{op.__name__}() got an unexpected keyword argument {unknown}; "
                            f"its options: {options}")
        if len(args) == len(leading) and leading_names.isdisjoint(kwargs):
            return args, kwargs
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{op.__name__}(): {err}") from None
        return bound.args, bound.kwargs
    return split


def _prelude(op_name: str, op: Callable, options: dict[str, Arg] | None, tensors: int
             ) -> Callable[[tuple, dict], tuple[tuple, dict]]:
    """What every public op does with its arguments first: bind them (an unknown keyword
    names the op), refuse leading arguments that are no tensors, check the declared options
    (``COMMON_OPTIONS`` the op has, and its own)."""
    split = _call_splitter(op)
    names = inspect.signature(op).parameters
    declared = {k: a for k, a in {**COMMON_OPTIONS, **(options or {})}.items() if k in names}

    def prelude(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = split(args, kwargs)
        for name, t in zip("qkv", args[:tensors], strict=False):
            if not isinstance(t, Tensor):
                raise ValueError(f"{op_name}: {name} must be a 4-D tensor (B, H, L, D), got "
                                 f"{type(t).__name__}")
        check_arguments(op_name, declared, {k: v for k, v in kwargs.items() if k in declared})
        return args, kwargs
    return prelude


def checked_weights(op_name: str, *, options: dict[str, Arg] | None = None
                    ) -> Callable[[Op], Op]:
    """Decorate a weights function ``f(q, k, *, causal, mask, ...)`` with the ops' argument
    checks (``_prelude``); its body then calls :func:`begin_weights`."""
    def decorate(op: Op) -> Op:
        prelude = _prelude(op_name, op, options, tensors=2)

        @functools.wraps(op)
        def checked(*args, **kwargs):
            args, kwargs = prelude(args, kwargs)
            return op(*args, **kwargs)
        return checked  # type: ignore[return-value]
    return decorate


# options of every op that has them, checked by the guard (an op adds its own)
COMMON_OPTIONS = {"causal": Arg("bool"), "scale": Arg("float", optional=True),
                  "block_size": Arg("int", optional=True, low=1)}


def guarded_op(op_name: str, *, first: Callable | None = None,
               options: dict[str, Arg] | None = None) -> Callable[[Op], Op]:
    """Decorate an op ``f(q, k, v, *, causal, mask, ...)`` (4-D tensors) with what every op
    does before and after its own work:

    - under ``torch.autocast``, q, k, v in autocast's dtype; q, k, v and the mask checked;
    - no sequence, query or key (B, Lq or Lk = 0): zeros, as for rows that see no key;
    - a key no row may see never reaches the output, whatever it holds, and one a row sees
      makes that row NaN: keys holding a non-finite number are zeroed before the op runs
      (``hide_nonfinite``) and NaN is added to the rows that may see them
      (``rows_seeing``). A returned state (a tuple after the output) becomes NaN for the
      (batch, head) pairs that saw such a key.

    ``first``: an attempt with the op's signature on the inputs as given, which returns None
    when it met a non-finite number in them (then the guarded op runs): for an op that can
    tell so within its own passes over k and v, the clean case costs no pass of the guard's.
    ``options``: declarations of the op's own keyword options, checked with
    ``COMMON_OPTIONS`` (those it has) before anything runs, naming the op and the option.
    """
    def decorate(op: Op) -> Op:
        prelude = _prelude(op_name, op, options, tensors=3)

        @functools.wraps(op)
        def guarded(*args, **kwargs):
            args, kwargs = prelude(args, kwargs)
            causal, mask = kwargs.get("causal", False), kwargs.get("mask")
            q, k, v = autocast_inputs(*args[:3])
            check_qkv(op_name, q, k, v, mask)
            check_op_bias(op_name, kwargs.get("bias"), q, k)
            if 0 in (q.shape[0], q.shape[2], k.shape[2]) and not kwargs.get("return_state"):
                # no sequence, no query or no key: every row sees nothing, which gives 0
                # (tied to the inputs, so that a backward gives them zero gradients)
                tie = (q.sum() + k.sum() + v.sum()) * 0
                return v.new_zeros(*q.shape[:3], v.shape[-1]) + tie.to(v.dtype)
            if first is not None and not tracing():  # its probe reads a number on the host
                out = first(q, k, v, *args[3:], **kwargs)
                if out is not None:
                    return out
            k, v, bad = hide_nonfinite(k, v)
            k, v = zero_padded_keys(k, v, mask)
            result = op(q, k, v, *args[3:], **kwargs)
            bad = expand_kv(bad.unsqueeze(-1), q.shape[1]).squeeze(-1)  # (B, H, Lk)
            out = result[0] if isinstance(result, tuple) else result
            out = out + nan_where(rows_seeing(bad, q.shape[2], causal=causal, mask=mask), out)
            if not isinstance(result, tuple):
                return out
            seen = rows_seeing(bad, 1, causal=False, mask=mask)[..., 0]  # (B, H)
            return out, tuple(t + nan_where(seen, t).view(*seen.shape, *(1,) * (t.dim() - 2))
                              for t in result[1])
        return guarded  # type: ignore[return-value]
    return decorate
