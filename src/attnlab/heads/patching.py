"""Activation patching and path patching: which pieces of a model carry the difference
between a clean and a corrupted input, as measured by a metric (e.g. a logit difference).

``activation_patching`` runs one input and replaces one piece of one activation (a head of a
hook point, optionally at one position; or a residual-stream point of a block) by its value
on the other input, for every piece in turn: denoising puts clean pieces into the corrupted
run, noising corrupted pieces into the clean run. ``path_patching`` (Wang et al., 2022,
"Interpretability in the Wild", the IOI circuit) measures the effect of sender heads that
reaches chosen receivers (heads' queries, keys or values, or the logits directly) and no
other way; ``path_patching_scores`` does it for every earlier head as a single sender.

The clean and corrupted runs are made once and cached; the patched runs go
``pieces_per_forward`` at a time through one forward (the input repeated along the batch
axis, each copy patched in its own piece), so a sweep costs about pieces / pieces_per_forward
forwards. Every tensor stays on the model's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.heads.metrics import Inputs, Metric, PatchScores, run_model
from attnlab.heads.sites import (
    POINTS,
    HeadSelection,
    Site,
    by_layer,
    forward_hooks,
    head_pairs,
    sites,
)

__all__ = ["HEAD_POINTS", "RESIDUAL_POINTS", "activation_patching", "path_patching",
           "path_patching_scores"]

HEAD_POINTS = POINTS  # q k v weights heads
RESIDUAL_POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")
DIRECTIONS = ("denoise", "noise")
# (head axis, position axis) of each head-level point: q (B, H, Lq, D), k and v (B, H_kv, Lk,
# D), weights (B, H, Lq, Lk), heads (B, Lq, H, D)
AXES = {"q": (1, 2), "k": (1, 2), "v": (1, 2), "weights": (1, 2), "heads": (2, 1)}
Forward = Callable[[nn.Module, Inputs], Tensor]
Piece = tuple[int, int | None, int | None]  # (layer, head or None, position or None)


# ------------------------------------------------------------------------------- inputs
def _batch_size(inputs: Inputs, what: str) -> int:
    """The number of sequences in ``inputs``: a tensor's first axis; in a mapping, that of
    ``input_ids`` (else of its first tensor)."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError(f"{what} is a 0-d tensor: inputs need a batch axis")
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        ids = inputs.get("input_ids")
        tensors = [ids] if isinstance(ids, Tensor) else \
            [v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0]
        if tensors and tensors[0].dim() > 0:
            return int(tensors[0].shape[0])
        raise ValueError(f"{what} has no tensor with a batch axis")
    raise ValueError(f"{what} must be a tensor or a mapping of model arguments, got "
                     f"{type(inputs).__name__}")


def _check_pair(clean: Inputs, corrupted: Inputs) -> int:
    """The batch size of two inputs that must line up entry by entry; ValueError where their
    kinds, keys or shapes differ."""
    b = _batch_size(clean, "clean")
    _batch_size(corrupted, "corrupted")
    if isinstance(clean, Tensor) != isinstance(corrupted, Tensor):
        raise ValueError("clean and corrupted must both be tensors or both mappings, got "
                         f"{type(clean).__name__} and {type(corrupted).__name__}")
    if isinstance(clean, Tensor) and isinstance(corrupted, Tensor):
        if clean.shape != corrupted.shape:
            raise ValueError(f"clean and corrupted must have the same shape, got "
                             f"{tuple(clean.shape)} and {tuple(corrupted.shape)}")
        return b
    assert isinstance(clean, Mapping) and isinstance(corrupted, Mapping)
    if set(clean) != set(corrupted):
        raise ValueError(f"clean and corrupted must have the same keys, got {sorted(clean)} "
                         f"and {sorted(corrupted)}")
    for key, value in clean.items():
        other = corrupted[key]
        if isinstance(value, Tensor) != isinstance(other, Tensor) or (
                isinstance(value, Tensor) and value.shape != other.shape):
            shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                      for v in (value, other)]
            raise ValueError(f"clean and corrupted must have the same shapes: {key!r} is "
                             f"{shapes[0]} and {shapes[1]}")
    return b


def _repeat(inputs: Inputs, copies: int, b: int) -> Inputs:
    """``inputs`` repeated ``copies`` times along the batch axis (copy i holds rows
    i*b .. (i+1)*b); in a mapping, the tensors whose first axis is the batch."""
    if copies == 1:
        return inputs
    if isinstance(inputs, Tensor):
        return torch.cat([inputs] * copies)
    return {k: torch.cat([v] * copies) if isinstance(v, Tensor) and v.dim() > 0
            and v.shape[0] == b else v for k, v in inputs.items()}


def _rows(copy: int, b: int) -> slice:
    return slice(copy * b, (copy + 1) * b)


def _logits(model: nn.Module, inputs: Inputs, forward: Forward | None, rows: int) -> Tensor:
    logits = (forward or run_model)(model, inputs)
    if not isinstance(logits, Tensor) or logits.dim() == 0 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the forward returned {shape}, expected logits with {rows} rows "
                         "on the first axis (one per sequence of the inputs)")
    return logits


def _value(metric: Metric, logits: Tensor) -> float:
    """The metric on ``logits`` as a float; ValueError unless it is one number."""
    out = metric(logits)
    t = out if isinstance(out, Tensor) else torch.as_tensor(out)
    if t.numel() != 1:
        raise ValueError(f"the metric must return a scalar (one number, e.g. a mean over the "
                         f"batch), got shape {tuple(t.shape)}")
    return float(t.detach().reshape(()))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextlib.contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` pieces (nothing when not ``enabled``); yields
    ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich import progress as rp

    with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                     rp.MofNCompleteColumn(), rp.TimeElapsedColumn()) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _check_layers(layers: Sequence[int] | None, count: int, what: str) -> list[int]:
    if layers is None:
        return list(range(count))
    chosen = sorted({int(x) for x in layers})
    bad = [x for x in chosen if not 0 <= x < count]
    if bad or not chosen:
        raise ValueError(f"layers {bad or '[]'} out of range: the model has {count} {what} "
                         f"(0..{count - 1})")
    return chosen


def _check_pieces_per_forward(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"pieces_per_forward must be an integer >= 1, got {n!r}")


# ----------------------------------------------------------------- activation patching
def activation_patching(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric, *,
                        point: str = "heads", per_position: bool = False,
                        direction: str = "denoise", layers: Sequence[int] | None = None,
                        forward: Forward | None = None, progress: bool = False,
                        pieces_per_forward: int = 16) -> PatchScores:
    """Patch every piece of ``point`` in turn and score the change of ``metric``.

    ``point``: a head-level hook point (``q``, ``k``, ``v``, ``weights``, ``heads``; the
    pieces are the heads of each attention layer, for ``k`` and ``v`` the key/value heads)
    or a residual-stream point of each block (``resid_pre``, ``attn_out``, ``mlp_out``,
    ``resid_post``; one piece per block). ``per_position`` adds a position axis (the query
    position; for ``k`` and ``v`` the key position). ``direction="denoise"`` runs
    ``corrupted`` with the piece replaced by its value on ``clean`` and scores
    metric(patched) - metric(corrupted run); ``"noise"`` runs ``clean`` with the corrupted
    piece, scoring metric(patched) - metric(clean run).

    Returns ``PatchScores`` of shape (layers, heads[, positions]) for head points (NaN where a
    layer has fewer heads or positions than the widest, and in the rows of layers not in
    ``layers``), (layers[, positions]) for residual points. ``forward(model, inputs)`` gives
    the logits where ``model(inputs)`` does not; ``metric(logits)`` must return one number.
    ``pieces_per_forward`` patched copies of the input share a forward (1: one forward
    per piece). ``layers`` chooses attention layers (``sites`` numbering) for head points,
    blocks for residual points. Patching ``weights`` runs the chosen layers on the dense
    weights path (as a capture of ``weights`` does), the unpatched runs included."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    _check_pieces_per_forward(pieces_per_forward)
    b = _check_pair(clean, corrupted)
    if point in AXES:
        return _head_sweep(model, clean, corrupted, metric, point, per_position, direction,
                           layers, forward, progress, int(pieces_per_forward), b)
    if point in RESIDUAL_POINTS:
        return _residual_sweep(model, clean, corrupted, metric, point, per_position, direction,
                               layers, forward, progress, int(pieces_per_forward), b)
    raise ValueError(f"unknown point {point!r}: head points are {', '.join(HEAD_POINTS)}, "
                     f"residual points {', '.join(RESIDUAL_POINTS)}")


def _piece_index(ndim: int, axes: tuple[int | None, int], head: int | None, position: int | None
                 ) -> tuple[Any, ...]:
    """The index of one piece in a hook tensor, without the batch axis."""
    index: list[Any] = [slice(None)] * (ndim - 1)
    if head is not None and axes[0] is not None:
        index[axes[0] - 1] = head
    if position is not None:
        index[axes[1] - 1] = position
    return tuple(index)


Edit = Callable[[Tensor], Tensor | None]
Editor = Callable[[Mapping[int, Edit]], contextlib.AbstractContextManager[None]]


def _sweep(edit: Editor, layers: Sequence[int], axes: tuple[int | None, int], model: nn.Module,
           clean: Inputs, corrupted: Inputs, metric: Metric, direction: str,
           per_position: bool, forward: Forward | None, progress: bool, per_forward: int,
           b: int, name: Callable[[int], str]) -> tuple[dict[Piece, float], float, float]:
    """The sweep behind ``activation_patching``. ``edit({layer: fn})`` is a context in which
    ``fn`` receives that layer's activation at the patched point and its non-None return
    replaces it; ``axes``: (head axis or None for whole layers, position axis) of those
    tensors. Returns ({piece: score}, clean metric, corrupted metric)."""

    def cached(inputs: Inputs) -> tuple[float, dict[int, Tensor]]:
        cache: dict[int, Tensor] = {}

        def keep(layer: int) -> Edit:
            def fn(value: Tensor) -> None:
                if layer in cache:
                    raise ValueError(f"{name(layer)} ran twice in one forward; patching needs "
                                     "one call per forward")
                cache[layer] = value.detach()
            return fn
        with edit({layer: keep(layer) for layer in layers}):
            logits = _logits(model, inputs, forward, b)
        missing = [name(layer) for layer in layers if layer not in cache]
        if missing:
            raise ValueError(f"{', '.join(missing)} did not run in the forward")
        return _value(metric, logits), cache

    with torch.no_grad():
        clean_metric, clean_cache = cached(clean)
        corrupted_metric, corrupted_cache = cached(corrupted)
        base, source, base_metric = (corrupted, clean_cache, corrupted_metric) \
            if direction == "denoise" else (clean, corrupted_cache, clean_metric)
        pieces: list[Piece] = []
        for layer in layers:
            t = clean_cache[layer]
            for h in (range(t.shape[axes[0]]) if axes[0] is not None else [None]):
                for p in (range(t.shape[axes[1]]) if per_position else [None]):
                    pieces.append((layer, h, p))
        scores: dict[Piece, float] = {}
        with _progress(progress, len(pieces), f"patching {name(-1)}") as advance:
            for chunk in _chunks(pieces, per_forward):
                copies = len(chunk)

                def patch(layer: int, chunk: Sequence[Piece] = chunk, copies: int = copies
                          ) -> Edit:
                    mine = [(i, h, p) for i, (lay, h, p) in enumerate(chunk) if lay == layer]
                    src = source[layer]

                    def fn(value: Tensor) -> Tensor | None:
                        if value.shape[0] != copies * b or value.shape[1:] != src.shape[1:]:
                            raise ValueError(
                                f"{name(layer)} has shape {tuple(value.shape)} in the patched "
                                f"run and {tuple(src.shape)} in the cached run (with "
                                f"{copies} copies of the input): the model does not keep "
                                "the batch axis first; use pieces_per_forward=1")
                        if not mine:
                            return None
                        value = value.clone()
                        for i, h, p in mine:
                            index = _piece_index(value.dim(), axes, h, p)
                            value[(_rows(i, b),) + index] = src[(slice(None),) + index]
                        return value
                    return fn
                with edit({layer: patch(layer) for layer in layers}):
                    logits = _logits(model, _repeat(base, copies, b), forward, copies * b)
                for i, piece in enumerate(chunk):
                    scores[piece] = _value(metric, logits[_rows(i, b)]) - base_metric
                advance(copies)
    return scores, clean_metric, corrupted_metric


@contextlib.contextmanager
def _hooks(modules: Mapping[Any, nn.Module], hooks: Mapping[Any, Callable[..., Any]]
           ) -> Iterator[None]:
    """Forward hooks ``hooks[key]`` on ``modules[key]`` inside the block (prepended, as
    ``sites.forward_hooks`` does: an edit runs before the hooks already there)."""
    handles = []
    try:
        for key, hook in hooks.items():
            handles.append(modules[key].register_forward_hook(hook, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _as_hook(fn: Edit) -> Callable[..., Tensor | None]:
    def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor | None:
        return fn(out)
    return hook


def _fill(scores: dict[Piece, float], layers: int, heads: bool, per_position: bool) -> Tensor:
    """{piece: score} as a NaN-padded (layers[, heads][, positions]) tensor."""
    shape = [layers]
    if heads:
        shape.append(1 + max(int(h or 0) for _, h, _ in scores))
    if per_position:
        shape.append(1 + max(int(p or 0) for _, _, p in scores))
    out = torch.full(shape, float("nan"), dtype=torch.float64)
    for (layer, h, p), value in scores.items():
        index = (layer, *((h,) if heads else ()), *((p,) if per_position else ()))
        out[index] = value
    return out


def _head_sweep(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric, point: str,
                per_position: bool, direction: str, layers: Sequence[int] | None,
                forward: Forward | None, progress: bool, per_forward: int, b: int
                ) -> PatchScores:
    model_sites = sites(model)
    chosen = _check_layers(layers, len(model_sites), "attention layers")

    def edit(fns: Mapping[int, Edit]) -> contextlib.AbstractContextManager[None]:
        return forward_hooks(model_sites, point, {layer: _as_hook(fn) for layer, fn in fns.items()})
    scores, clean_metric, corrupted_metric = _sweep(
        edit, chosen, AXES[point], model, clean, corrupted, metric, direction, per_position,
        forward, progress, per_forward, b,
        lambda layer: f"L{layer}.{point}" if layer >= 0 else point)
    axes = ("layer", "head", "position") if per_position else ("layer", "head")
    return PatchScores(_fill(scores, len(model_sites), True, per_position), axes, point,
                       "activation patching", direction, clean_metric, corrupted_metric)


def _residual_sweep(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric,
                    point: str, per_position: bool, direction: str,
                    layers: Sequence[int] | None, forward: Forward | None, progress: bool,
                    per_forward: int, b: int) -> PatchScores:
    from attnlab.heads import points

    names = points.hook_points(model)
    count = 0
    while f"blocks.{count}.resid_pre" in names:
        count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no residual blocks attnlab can reach")
    chosen = _check_layers(layers, count, "blocks")

    def edit(fns: Mapping[int, Edit]) -> contextlib.AbstractContextManager[None]:
        return points.edit_points(model, {f"blocks.{i}.{point}": fn for i, fn in fns.items()})
    scores, clean_metric, corrupted_metric = _sweep(
        edit, chosen, (None, 1), model, clean, corrupted, metric, direction, per_position,
        forward, progress, per_forward, b,
        lambda i: f"blocks.{i}.{point}" if i >= 0 else point)
    axes = ("layer", "position") if per_position else ("layer",)
    return PatchScores(_fill(scores, count, False, per_position), axes, point,
                       "activation patching", direction, clean_metric, corrupted_metric)


# ----------------------------------------------------------------------- path patching
def _check_via(via: str) -> str:
    letters = "".join(dict.fromkeys(via)) if isinstance(via, str) else ""
    if not letters or any(c not in "qkv" for c in letters):
        raise ValueError(f"via must name the receivers' inputs: 'q', 'k', 'v' or a "
                         f"combination such as 'qkv', got {via!r}")
    return letters


def _receivers(receivers: HeadSelection | str, model_sites: list[Site]
               ) -> dict[int, list[int]] | None:
    """None for the logits, else the receivers {layer: heads} (checked)."""
    if isinstance(receivers, str):
        if receivers != "logits":
            raise ValueError(f"receivers must be 'logits' or (layer, head) pairs, got "
                             f"{receivers!r}")
        return None
    chosen = by_layer(head_pairs(receivers, model_sites))
    if not chosen:
        raise ValueError("receivers is empty: name at least one (layer, head), or 'logits'")
    return chosen


def _path_values(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric,
                 sender_sets: Sequence[Sequence[tuple[int, int]]],
                 receivers: dict[int, list[int]] | None, via: str, forward: Forward | None,
                 progress: bool, per_forward: int) -> tuple[list[float], float, float]:
    """Path patching of each sender set (one value each), with the clean and corrupted
    metric. Each set is one copy of the clean input in a batched forward."""
    b = _check_pair(clean, corrupted)
    model_sites = sites(model)
    outputs = {s.layer: s.hook("heads") for s in model_sites}

    def cached(inputs: Inputs) -> tuple[float, dict[int, Tensor]]:
        cache: dict[int, Tensor] = {}

        def keep(layer: int) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
                cache[layer] = out.detach()
            return hook
        with _hooks(outputs, {layer: keep(layer) for layer in outputs}):
            logits = _logits(model, inputs, forward, b)
        return _value(metric, logits), cache

    values: list[float] = []
    with torch.no_grad():
        clean_metric, clean_heads = cached(clean)
        corrupted_metric, corrupted_heads = cached(corrupted)
        run = _PathRun(model, model_sites, clean, b, clean_heads, corrupted_heads, receivers,
                       via, forward)
        with _progress(progress, len(sender_sets), "path patching") as advance:
            for chunk in _chunks(sender_sets, per_forward):
                logits = run(chunk)
                values.extend(_value(metric, logits[_rows(i, b)]) - clean_metric
                              for i in range(len(chunk)))
                advance(len(chunk))
    return values, clean_metric, corrupted_metric


class _PathRun:
    """Steps 2 and 3 of path patching for a chunk of sender sets, one copy of the clean
    input per set; calling it returns the final logits (of step 3, or of step 2 when the
    receivers are the logits)."""

    def __init__(self, model: nn.Module, model_sites: list[Site], clean: Inputs, b: int,
                 clean_heads: dict[int, Tensor], corrupted_heads: dict[int, Tensor],
                 receivers: dict[int, list[int]] | None, via: str,
                 forward: Forward | None) -> None:
        self.model, self.sites, self.clean, self.b = model, model_sites, clean, b
        self.clean_heads, self.corrupted_heads = clean_heads, corrupted_heads
        self.receivers, self.forward = receivers, forward
        self.inputs = {(layer, c): model_sites[layer].hook(c)
                       for layer in (receivers or {}) for c in via}

    def _frozen(self, layer: int, chunk: Sequence[Sequence[tuple[int, int]]]
                ) -> Callable[..., Tensor]:
        """Step 2's hook on ``L<layer>.heads``: every head's output is its clean value, the
        senders' their corrupted one, whatever the run computed (MLPs are recomputed)."""
        mine = [(i, h) for i, senders in enumerate(chunk) for lay, h in senders if lay == layer]
        clean, corrupted, b = self.clean_heads[layer], self.corrupted_heads[layer], self.b

        def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
            value = torch.cat([clean] * len(chunk))
            if value.shape != out.shape:
                raise ValueError(f"L{layer}.heads has shape {tuple(out.shape)} here, "
                                 f"{tuple(value.shape)} in the cached runs")
            for i, h in mine:
                value[_rows(i, b), :, h] = corrupted[:, :, h]
            return value
        return hook

    def __call__(self, chunk: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
        copies = len(chunk)
        inputs = _repeat(self.clean, copies, self.b)
        recorded: dict[tuple[int, str], Tensor] = {}

        def record(key: tuple[int, str]) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
                recorded[key] = out.detach()
            return hook
        frozen = {s.layer: self._frozen(s.layer, chunk) for s in self.sites}
        with forward_hooks(self.sites, "heads", frozen), \
                _hooks(self.inputs, {key: record(key) for key in self.inputs}):
            logits = _logits(self.model, inputs, self.forward, copies * self.b)
        if self.receivers is None:
            return logits
        missing = [f"L{layer}.{c}" for layer, c in self.inputs if (layer, c) not in recorded]
        if missing:
            raise ValueError(f"{', '.join(missing)} did not run in the forward")

        def patched(key: tuple[int, str]) -> Callable[..., Tensor]:
            layer, c = key
            assert self.receivers is not None
            value = recorded[key]
            idx = _input_heads(self.receivers[layer], self.sites[layer], value, c)

            def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
                out = out.clone()
                out[:, idx] = value[:, idx]
                return out
            return hook
        with _hooks(self.inputs, {key: patched(key) for key in self.inputs}):
            return _logits(self.model, inputs, self.forward, copies * self.b)


def _input_heads(heads: Iterable[int], site: Site, t: Tensor, point: str) -> list[int]:
    """The heads of ``t`` (a receiver layer's q, k or v) that feed the receiver heads: the
    query heads themselves, or for k and v their key/value heads (under grouped-query
    attention a kv head feeds every query head of its group)."""
    if point == "q":
        return sorted(set(heads))
    kv = int(t.shape[1])
    group = site.heads // kv
    return sorted({h // group for h in heads})


def path_patching(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric, *,
                  senders: HeadSelection, receivers: HeadSelection | str = "logits",
                  via: str = "qkv", forward: Forward | None = None) -> float:
    """The effect on ``metric`` of the ``senders``' corrupted outputs along the paths that
    reach the ``receivers`` directly (through MLPs, through no other attention head).

    Wang et al.'s path patching (noising): (1) clean and corrupted runs are cached; (2) the
    clean input is run with the senders' head outputs set to their corrupted values and every
    other head's output frozen at its clean value (MLPs are recomputed), recording the
    receivers' inputs named by ``via`` (``q``, ``k``, ``v`` or a combination; for ``k`` and
    ``v`` the receiver's key/value head, shared by its group under grouped-query attention);
    (3) the clean input is run with only those receiver inputs patched. Returns metric(3) -
    metric(clean). ``receivers="logits"``: the direct path to the output, metric(2) -
    metric(clean). Senders and receivers are ``{layer: [heads]}`` or ``[(layer, head)]``."""
    model_sites = sites(model)
    chosen = head_pairs(senders, model_sites)
    if not chosen:
        raise ValueError("senders is empty: name at least one (layer, head)")
    values, _, _ = _path_values(model, clean, corrupted, metric, [chosen],
                                _receivers(receivers, model_sites), _check_via(via), forward,
                                False, 1)
    return values[0]


def path_patching_scores(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric,
                         *, receivers: HeadSelection | str = "logits", via: str = "qkv",
                         forward: Forward | None = None, progress: bool = False,
                         pieces_per_forward: int = 16) -> PatchScores:
    """``path_patching`` with every head before the receivers as the single sender:
    (layers, heads) scores; a head at or after the last receiver layer, which has no path to
    the receivers, is NaN (with ``receivers="logits"`` every head is a sender)."""
    _check_pieces_per_forward(pieces_per_forward)
    model_sites = sites(model)
    chosen = _receivers(receivers, model_sites)
    letters = _check_via(via)
    limit = len(model_sites) if chosen is None else max(chosen)
    sender_sets = [[(s.layer, h)] for s in model_sites[:limit] for h in range(s.heads)]
    if not sender_sets:
        raise ValueError(f"no head comes before the receivers (layer {limit}): nothing to "
                         "send")
    values, clean_metric, corrupted_metric = _path_values(
        model, clean, corrupted, metric, sender_sets, chosen, letters, forward, progress,
        int(pieces_per_forward))
    scores = torch.full((len(model_sites), max(s.heads for s in model_sites)), float("nan"),
                        dtype=torch.float64)
    for [(layer, h)], value in zip(sender_sets, values, strict=True):
        scores[layer, h] = value
    target = "logits" if chosen is None else \
        " ".join(f"L{layer}.h{h}" for layer, hs in chosen.items() for h in hs) + f" ({letters})"
    return PatchScores(scores, ("layer", "head"), f"heads -> {target}", "path patching",
                       "noise", clean_metric, corrupted_metric)
