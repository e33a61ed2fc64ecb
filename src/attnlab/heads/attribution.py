"""Attribution patching (AtP) and edge attribution patching (EAP): activation patching's
first-order estimate, from one forward and backward pass instead of one forward per piece.

Activation patching replaces one piece ``a`` of a run (a head's output, its queries, ...) by its
value ``a'`` from another run and measures metric(patched) - metric(unpatched run). AtP (Nanda
2023; Kramar et al. 2024, "AtP*") estimates every piece at once by the first-order Taylor term

    score(piece) ~= (a' - a) . d metric / d a        (the gradient at the unpatched run)

``attribution_patching`` returns the same ``PatchScores`` (axes, sign and NaN padding) as
activation patching (``heads.patching.activation_patching``), so the two compare entry by
entry; the estimate is exact wherever the metric is linear in the piece (e.g. a head's output
read out linearly) and misses the curvature elsewhere (notably a saturated softmax: see
``docs``' attribution section). ``steps=m`` > 1 takes the gradient as integrated gradients
do (the activation variant of EAP-IG, Hanna, Pezzelle and Belinkov 2024): the mean over m
points on the line from the base activations to the target ones, one layer (one writer group
for EAP) moved at a time, which sees a fall of the metric that the slope at the base run
misses. Kramár et al.'s QK fix (the patched attention pattern computed exactly) is not
implemented.

EAP (Syed, Rager, Conmy 2023) scores the edges of the residual-stream graph: upstream nodes
write into the residual stream (``"embed"``: the residual entering the first block; ``"L<l>.H<h>"``:
head h of layer l, its ``hook_heads`` value through what follows it in its attention module:
gate, ``head_scale``, output projection), downstream nodes read from it (``"L<l>.H<h>.q|k|v"``:
head h's query, key or value input; ``"logits"``: the final residual through the final norm and
the unembedding). An edge u -> v is the direct path of u's output into v's input:

    score(u -> v) = (out_u(target) - out_u(base)) . d metric / d in_v (base run)

where the gradient reaches ``in_v`` (the residual stream at v's block input) through head v's
q (or k, v) alone: a vector-Jacobian product of the block's norm and projections with the
``hook_q`` (``hook_k``, ``hook_v``) gradient restricted to that head. By default MLPs are not
nodes: an edge's score is its direct path only, and the edges out of a head add up to its AtP
score exactly when nothing else reads the residual stream (attention-only models). With
``mlps=True`` each block's MLP is a node too, the standard graph of Syed et al. and of Hanna
et al. (EAP-IG): the sender ``"L<l>.MLP"`` writes ``blocks.<l>.mlp_out``, the receiver
``"L<l>.MLP.in"`` is the residual the MLP reads (after its block's attention), the gradient
taken at the input of the MLP's own norm (``heads.points.BlockParts.mlp_in``), so it flows
through the MLP alone; then everything that reads the residual is a receiver and the edges
out of every sender add up to its AtP score.
The blocks, attention and MLP outputs and the residual points are found and hooked through
``heads.points`` (``layout``, ``edit_points``). EAP assumes pre-norm residual blocks (the
residual entering a block is the sum of the embedding and every earlier sublayer's output):
attnlab's ``TransformerLM``, GPT-2, Llama and the like; BERT's post-norm blocks are refused,
and so are MLP nodes in parallel blocks (the MLP reading the residual before the attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.heads.metrics import Inputs, Metric, PatchScores, run_model
from attnlab.heads.points import _pre_input, edit_points, hook_points, layout
from attnlab.heads.sites import POINTS, Site, forward_hooks, sites

__all__ = ["RESIDUAL_POINTS", "attribution_patching", "edge_attribution_patching", "EdgeScores",
           "Agreement", "agreement"]

Forward = Callable[[nn.Module, Inputs], Tensor]
DIRECTIONS = ("denoise", "noise")
# where the head and the sequence position are in each hook point's tensor
_HEAD_DIM = {"q": 1, "k": 1, "v": 1, "weights": 1, "heads": 2}
_POSITION_DIM = {"q": 2, "k": 2, "v": 2, "weights": 2, "heads": 1}  # weights: the query row
READS = ("q", "k", "v")
RESIDUAL_POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # heads.points, per block


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'denoise' (clean activations into the corrupted "
                         f"run) or 'noise' (corrupted into the clean run), got {direction!r}")


def _scalar(value: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"the metric must return one number (a 0-d tensor), got {shape} "
                         f"on the {what} run")
    return value.reshape(())


def _base_and_target(clean: Inputs, corrupted: Inputs, direction: str
                     ) -> tuple[Inputs, Inputs]:
    """(the run the gradient is taken at, the run whose activations are patched in)."""
    return (corrupted, clean) if direction == "denoise" else (clean, corrupted)


def _check_same_shape(name: str, base: Tensor, target: Tensor) -> None:
    if base.shape != target.shape:
        raise ValueError(f"{name} has shape {tuple(target.shape)} on one input and "
                         f"{tuple(base.shape)} on the other: clean and corrupted inputs must "
                         "have the same batch size and length")


class _Recorder:
    """Forward hooks that keep each layer's activation at one hook point and, on a gradient
    run, add a zero leaf tensor to it: d metric / d (that leaf) is d metric / d activation,
    through every later path, whether or not the model's parameters require gradients."""

    def __init__(self, grad: bool) -> None:
        self.grad = grad
        self.values: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self.leaves: dict[int, Tensor] = {}
        self.mix: dict[int, Callable[[Tensor], Tensor]] = {}  # layer -> what replaces out

    def take(self, layer: int, what: str, out: Tensor) -> Tensor:
        """Record ``out`` as layer ``layer``'s value; on a gradient run return it plus a zero
        leaf (the tensor that flows on). A layer in ``mix`` first has ``out`` replaced."""
        if layer in self.values:
            raise ValueError(f"{what} ran twice in one forward: attribution needs one value "
                             "per hook point and run")
        if layer in self.mix:
            out = self.mix[layer](out)
        self.values[layer] = out.detach()
        if self.grad:
            leaf = torch.zeros_like(out, requires_grad=True)
            self.leaves[layer] = leaf
            out = out + leaf
            self.outputs[layer] = out
        return out

    def hook(self, layer: int, what: str) -> Callable[..., Tensor]:
        """A forward hook doing ``take`` on a module's output."""
        def record(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            return self.take(layer, what, out)
        return record

    def edit(self, layer: int, what: str) -> Callable[[Tensor], Tensor]:
        """An ``points.edit_points`` function doing ``take``."""
        return lambda x: self.take(layer, what, x)

    def gradients(self, of: Tensor) -> dict[int, Tensor]:
        """d ``of`` / d activation for every recorded layer (zeros where it does not reach)."""
        layers = sorted(self.leaves)
        grads = torch.autograd.grad(of, [self.leaves[i] for i in layers], retain_graph=True,
                                    allow_unused=True)
        return {i: torch.zeros_like(self.leaves[i]) if g is None else g
                for i, g in zip(layers, grads, strict=True)}


class _Interpolator(_Recorder):
    """Forward hooks that set one layer's activation at a hook point to
    ``start + alpha * (end - start)`` plus a zero leaf (every other layer runs as it would):
    a point on the straight line from the base run's activation to the target run's, where
    integrated gradients takes the gradient."""

    def __init__(self, layer: int, start: Tensor, end: Tensor, alpha: float) -> None:
        super().__init__(grad=True)
        self.layer, self.start, self.end, self.alpha = layer, start, end, alpha

    def take(self, layer: int, what: str, out: Tensor) -> Tensor:
        if layer != self.layer:
            return out
        if layer in self.leaves:
            raise ValueError(f"{what} ran twice in one forward: attribution needs one value "
                             "per hook point and run")
        mixed = torch.lerp(self.start.to(out.dtype), self.end.to(out.dtype), self.alpha)
        leaf = torch.zeros_like(out, requires_grad=True)
        self.leaves[layer] = leaf
        return mixed + leaf


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (1: plain attribution patching, the "
                         f"gradient at the base run; m: integrated gradients over m points), "
                         f"got {steps!r}")


def _run(model: nn.Module, forward: Forward, inputs: Inputs) -> Tensor:
    return forward(model, inputs)


def _reduce(product: Tensor, point: str, per_position: bool) -> Tensor:
    """Sum an elementwise product over everything but the head (and the position): (H[, L])."""
    head, pos = _HEAD_DIM[point], _POSITION_DIM[point]
    keep = (head, pos) if per_position else (head,)
    summed = product.sum(dim=[d for d in range(product.dim()) if d not in keep])
    return summed if not per_position or head < pos else summed.transpose(0, 1)


def _promoted(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def attribution_patching(model: nn.Module, clean: Inputs, corrupted: Inputs, metric: Metric,
                         *, point: str = "heads", per_position: bool = False,
                         direction: str = "denoise", forward: Forward | None = None,
                         steps: int = 1) -> PatchScores:
    """AtP: the first-order estimate of activation patching of every head (and position) at
    ``point`` (``q``, ``k``, ``v``, ``weights`` or ``heads``), or of every block's residual
    point (``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_post``, through
    ``heads.points``), from one forward and backward pass on the base input and one forward
    pass on the other.

    ``direction="denoise"``: the base run is ``corrupted`` and the clean activations are
    patched in; ``"noise"``: the reverse. The score of head h (and position p) is
    sum over its entries of (a_target - a_base) * d metric / d a at the base run, summed over
    the batch, the head's width (and the positions, unless ``per_position``): the estimate of
    metric(patched) - metric(base run), with ``activation_patching``'s axes ``("layer",
    "head"[, "position"])``, its sign and its NaN padding of layers with fewer heads. ``k``
    and ``v`` count key/value heads; the position of ``weights`` is the query row. Residual
    points give (blocks[, positions]), axes ``("layer"[, "position"])``, as activation
    patching does.

    ``metric`` maps the logits to one number (``heads.metrics.logit_difference``, ...);
    ``forward(model, inputs)`` returns the logits (default ``heads.metrics.run_model``: a token
    tensor or a mapping of keyword arguments, on attnlab and Hugging Face models).

    ``steps`` (integrated gradients, the activation variant of EAP-IG, Hanna, Pezzelle and
    Belinkov 2024): 1 is plain AtP, the gradient at the base run. With ``steps = m`` the
    gradient of each layer's pieces is the mean of the gradients at the m points
    ``a_base + (k / m) (a_target - a_base)``, k = 0 .. m - 1 (the left Riemann sum from the
    base run, so k = 0 is AtP's gradient), where every piece of that layer's ``point`` (all its
    heads, all positions, the whole batch) is set to the point on the line and every other
    layer runs as it does on the base input; one layer at a time, (m - 1) x layers more
    forward and backward passes. Where one piece is a whole layer (a residual point without
    ``per_position``) its score tends to activation patching's as m grows (error O(1/m));
    otherwise the scores of a layer's pieces add up to patching all of them at once, in the
    limit. Exact at any m where the metric is linear in the piece. Unlike AtP, it sees the
    metric's fall where the slope at the base run is flat (a saturated softmax)."""
    _check_direction(direction)
    _check_steps(steps)
    if point not in POINTS and point not in RESIDUAL_POINTS:
        raise ValueError(f"unknown point {point!r}: head points are {', '.join(POINTS)}, "
                         f"residual points {', '.join(RESIDUAL_POINTS)}")
    forward = forward or run_model
    base_inputs, target_inputs = _base_and_target(clean, corrupted, direction)
    target, base = _Recorder(grad=False), _Recorder(grad=True)
    with torch.no_grad(), _recording(model, point, target) as layers:
        target_metric = _scalar(metric(_run(model, forward, target_inputs)), "target")
    with torch.enable_grad(), _recording(model, point, base):
        base_metric = _scalar(metric(_run(model, forward, base_inputs)), "base")
        if not base_metric.requires_grad:
            raise ValueError("the metric does not depend on the model's activations (it "
                             "returned a tensor without a gradient): compute it from the "
                             "logits it is given")
        grads = base.gradients(base_metric)

    per_layer: list[Tensor] = []
    for layer, name in enumerate(layers):
        if layer not in base.values or layer not in target.values:
            raise ValueError(f"{name} did not run: the model never reached that hook point")
        a_base, a_target = base.values[layer], target.values[layer]
        _check_same_shape(name, a_base, a_target)
        grad = _promoted(grads[layer])
        if steps > 1:
            grad = _integrated(model, forward, base_inputs, metric, point, layer, a_base,
                               a_target, grad, steps)
        product = (_promoted(a_target) - _promoted(a_base)) * grad
        if point in POINTS:
            per_layer.append(_reduce(product, point, per_position))
        else:  # (B, L, C): the position is axis 1
            per_layer.append(product.sum(dim=(0, 2)) if per_position else product.sum())
    axes: tuple[str, ...]
    if point in POINTS:
        scores = _stack_padded(per_layer)
        axes = ("layer", "head", "position") if per_position else ("layer", "head")
    else:
        scores = torch.stack(per_layer)
        axes = ("layer", "position") if per_position else ("layer",)
    metrics = {"base": float(base_metric.detach()), "target": float(target_metric)}
    clean_value, corrupted_value = ((metrics["target"], metrics["base"]) if direction ==
                                    "denoise" else (metrics["base"], metrics["target"]))
    method = "attribution" if steps == 1 else f"attribution (integrated gradients, {steps} steps)"
    return PatchScores(scores.detach().cpu(), axes, point, method, direction,
                       clean_value, corrupted_value)


def _integrated(model: nn.Module, forward: Forward, base_inputs: Inputs, metric: Metric,
                point: str, layer: int, start: Tensor, end: Tensor, first: Tensor,
                steps: int) -> Tensor:
    """The mean gradient of the metric at layer ``layer``'s ``point`` over the ``steps`` points
    start + (k / steps) (end - start), k = 0 .. steps - 1; ``first`` is the one at k = 0 (the
    base run's gradient, already taken), in the promoted dtype."""
    total = first.clone()
    for k in range(1, steps):
        mixer = _Interpolator(layer, start, end, k / steps)
        with torch.enable_grad(), _recording(model, point, mixer):
            value = _scalar(metric(_run(model, forward, base_inputs)), "interpolated")
            if layer not in mixer.leaves:
                raise ValueError(f"layer {layer}'s {point} did not run on the interpolated run")
            (g,) = torch.autograd.grad(value, mixer.leaves[layer], allow_unused=True)
        if g is not None:
            total += _promoted(g)
    return total / steps


@contextlib.contextmanager
def _recording(model: nn.Module, point: str, recorder: _Recorder) -> Iterator[list[str]]:
    """Inside the block, ``recorder`` takes ``point`` of every layer (head-level points:
    ``heads.sites``' hook points; residual points: ``heads.points.edit_points`` on each
    block); yields the names of the layers' points."""
    if point in POINTS:
        model_sites = sites(model)
        names = [f"L{s.layer}.{point}" for s in model_sites]
        with forward_hooks(model_sites, point, {s.layer: recorder.hook(s.layer, names[i])
                                                for i, s in enumerate(model_sites)}):
            yield names
        return
    from attnlab.heads import points

    known = points.hook_points(model)
    names = []
    while f"blocks.{len(names)}.{point}" in known:
        names.append(f"blocks.{len(names)}.{point}")
    if not names:
        raise ValueError(f"{type(model).__name__} has no {point} hook points (heads.points "
                         "finds no residual blocks)")
    with points.edit_points(model, {n: recorder.edit(i, n) for i, n in enumerate(names)}):
        yield names


def _stack_padded(rows: Sequence[Tensor]) -> Tensor:
    """Per-layer (H_l[, L]) scores as (layers, max H[, L]), NaN where a layer has no head."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), float("nan"))
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


# ------------------------------------------------------------------------------ EAP


@dataclass
class EdgeScores:
    """Scores of the edges u -> v of the residual-stream graph (``edge_attribution_patching``).

    ``upstream``: the writers (``"embed"``, ``"L<l>.H<h>"``, with ``mlps=True`` also
    ``"L<l>.MLP"``), in model order; ``downstream``: the readers (``"L<l>.H<h>.q"``, ``.k``,
    ``.v`` -- k and v count key/value heads --, with ``mlps=True`` ``"L<l>.MLP.in"``, and
    ``"logits"``);
    ``scores`` (upstream x downstream): each edge's estimate of metric(edge patched) -
    metric(base run); ``valid`` marks the edges that exist (u writes before v reads: an
    upstream head feeds only later layers and its own layer's MLP, an MLP only later layers);
    the others hold 0. ``direction``, ``clean`` and
    ``corrupted`` as in ``PatchScores``."""

    upstream: list[str]
    downstream: list[str]
    scores: Tensor
    valid: Tensor
    direction: str
    clean: float
    corrupted: float
    method: str = "edge attribution"

    def score(self, upstream: str, downstream: str) -> float:
        """The score of one edge, by node names."""
        return float(self.scores[self._index(self.upstream, upstream, "upstream"),
                                 self._index(self.downstream, downstream, "downstream")])

    def top(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The ``k`` existing edges of largest absolute score: (upstream, downstream, score)."""
        flat = self.scores.masked_fill(~self.valid, 0.0).flatten()
        count = min(k, int(self.valid.sum()))
        order = flat.abs().argsort(descending=True, stable=True)[:count]
        width = self.scores.shape[1]
        return [(self.upstream[int(o) // width], self.downstream[int(o) % width],
                 float(flat[o])) for o in order]

    @staticmethod
    def _index(names: list[str], name: str, side: str) -> int:
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"no {side} node {name!r}{hint}")
        return names.index(name)


@dataclass(frozen=True)
class _Stack:
    """What EAP needs of a model, found through ``heads.points``: its attention layers (one
    self-attention site per residual block, ``model_sites[i]`` in block ``i``), the names of
    the attnlab residual-branch points of each block, and per block the module whose input is
    the residual its MLP reads (``points.BlockParts.mlp_in``; None: no MLP node there)."""

    model: nn.Module
    model_sites: list[Site]
    blocks: int
    branches: list[list[str]]
    mlp: list[nn.Module | None]

    @property
    def mlp_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.mlp) if m is not None]


def _stack(model: nn.Module, mlps: bool) -> _Stack:
    """The blocks of ``model`` (``heads.points.layout``) with the attention site of each;
    ValueError where EAP's graph does not fit (post-norm blocks, cross-attention, not one
    attention layer per block, an MLP node asked for whose input residual cannot be found)."""
    model_sites = sites(model)
    lay = layout(model)
    if lay.family == "post-norm":
        raise ValueError(f"{type(model).__name__} has post-norm blocks (BERT-like: a LayerNorm "
                         "after each residual add): edge attribution needs pre-norm blocks, "
                         "whose residual is the sum of the embedding and every earlier "
                         "sublayer's output")
    if any(s.kind != "self" for s in model_sites) or len(model_sites) != len(lay.blocks) or \
            any(not s.path.startswith(part.path + ".")
                for s, part in zip(model_sites, lay.blocks, strict=False)):
        raise ValueError("edge attribution needs one self-attention layer per residual "
                         f"block (a decoder-only or encoder-only stack); this model has "
                         f"{len(model_sites)} attention layers ({', '.join(map(str, model_sites))}"
                         f") in {len(lay.blocks)} blocks")
    names = hook_points(model)
    branches = [[n for n in (f"blocks.{i}.before_out", f"blocks.{i}.after_out") if n in names]
                for i in range(len(lay.blocks))]
    mlp: list[nn.Module | None] = [None] * len(lay.blocks)
    for part in lay.blocks if mlps else ():
        if part.mlp is None:
            continue  # an attention-only block: no MLP node
        if part.mlp_in is None:
            raise ValueError(f"block {part.path} ({type(part.block).__name__}): its MLP has no "
                             "norm of its own before it that heads.points knows (a norm shared "
                             "with the attention, as in parallel blocks, or another name), so "
                             "the residual the MLP reads cannot be hooked apart from the "
                             "attention's: use mlps=False")
        mlp[part.index] = part.mlp_in
    return _Stack(model, model_sites, len(lay.blocks), branches, mlp)


class _Graph:
    """The hooks of one EAP run, through ``heads.points.edit_points`` (all but one kind): the
    residual entering each block (``resid_pre``; a zero leaf on the gradient run, read by the
    heads' q/k/v), what each attention adds (``attn_out``), each MLP's output (``mlp_out``),
    the residual leaving the last block (``resid_post``; a leaf, read by the logits),
    hook_q/k/v/heads of every layer and, with MLP nodes, the residual each MLP reads: a
    forward pre-hook on its norm (``points.BlockParts.mlp_in``), whose leaf reaches the MLP
    alone. A recorder's ``mix`` replaces a value (integrated gradients)."""

    def __init__(self, stack: _Stack, grad: bool) -> None:
        self.stack, self.grad = stack, grad
        self.points = {p: _Recorder(grad) for p in (*READS, "heads")}
        self.resid = _Recorder(grad)  # block -> the residual entering it
        self.final = _Recorder(grad)  # the last block -> the residual leaving it
        self.mlp_in = _Recorder(grad)  # block -> the residual its MLP reads
        self.mlp_out = _Recorder(grad=False)  # block -> what its MLP adds
        self.attn_out: dict[int, Tensor] = {}  # in the autograd graph on the gradient run
        self.branch: dict[int, list[Tensor]] = {}

    @property
    def last(self) -> int:
        return self.stack.blocks - 1

    def _keep_attn_out(self, layer: int) -> Callable[[Tensor], None]:
        def keep(x: Tensor) -> None:
            self.attn_out[layer] = x
        return keep

    def _keep_branch(self, layer: int) -> Callable[[Tensor], None]:
        def keep(x: Tensor) -> None:
            self.branch.setdefault(layer, []).append(x.detach())
        return keep

    def _mlp_input(self, layer: int) -> Callable[..., Any]:
        what = f"the residual the MLP of block {layer} reads"

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x, positional = _pre_input(args, kwargs, what)
            x = self.mlp_in.take(layer, what, x)
            return ((x, *args[1:]), kwargs) if positional else \
                (args, {**kwargs, "hidden_states": x})
        return pre

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        s = self.stack
        edits: dict[str, Callable[[Tensor], Tensor | None]] = {}
        for i in range(s.blocks):
            edits[f"blocks.{i}.resid_pre"] = self.resid.edit(i, f"blocks.{i}.resid_pre")
            edits[f"blocks.{i}.attn_out"] = self._keep_attn_out(i)
            if s.mlp[i] is not None:
                edits[f"blocks.{i}.mlp_out"] = self.mlp_out.edit(i, f"blocks.{i}.mlp_out")
                edits.update((name, self._keep_branch(i)) for name in s.branches[i])
        edits[f"blocks.{self.last}.resid_post"] = self.final.edit(
            self.last, f"blocks.{self.last}.resid_post")
        for site in s.model_sites:
            for p, rec in self.points.items():
                edits[f"L{site.layer}.{p}"] = rec.edit(site.layer, f"L{site.layer}.{p}")
        handles = []
        try:
            for i in s.mlp_layers:
                module = s.mlp[i]
                assert module is not None
                handles.append(module.register_forward_pre_hook(self._mlp_input(i),
                                                                with_kwargs=True))
            with edit_points(s.model, edits):
                yield
        finally:
            for h in handles:
                h.remove()

    def check(self) -> None:
        """ValueError unless every hook ran and each MLP read the residual after its block's
        attention (resid_pre + branches + attn_out, to rounding): not a parallel block."""
        for i in range(self.stack.blocks):
            if i not in self.resid.values or i not in self.attn_out:
                raise ValueError(f"block {i} did not run")
        if self.last not in self.final.values:
            raise ValueError("the last block did not run")
        for i in self.stack.mlp_layers:
            if i not in self.mlp_in.values or i not in self.mlp_out.values:
                raise ValueError(f"the MLP of block {i} did not run")
            parts = [self.resid.values[i], *self.branch.get(i, []),
                     self.attn_out[i].detach()]
            read = _promoted(self.mlp_in.values[i])
            expected = sum((_promoted(p) for p in parts), torch.zeros_like(read))
            scale = sum(float(p.abs().max()) for p in parts)
            if float((read - expected).abs().max()) > 16 * torch.finfo(
                    self.mlp_in.values[i].dtype).eps * max(scale, 1.0):
                raise ValueError(f"the MLP of block {i} does not read the residual after the "
                                 "block's attention (resid_pre + attn_out): a parallel block, "
                                 "or a residual scaled before the add; edge attribution with "
                                 "MLP nodes needs sequential pre-norm blocks (use mlps=False)")


def _batched_vjp(output: Tensor, leaf: Tensor, cotangents: Tensor) -> Tensor:
    """d <output, c> / d leaf for each cotangent c (N, *output.shape): (N, *leaf.shape)."""
    try:
        (g,) = torch.autograd.grad(output, leaf, cotangents, retain_graph=True,
                                   is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one product at a time
        rows = [torch.autograd.grad(output, leaf, c, retain_graph=True, allow_unused=True)[0]
                for c in cotangents]
        g = None if rows[0] is None else torch.stack(rows)
    return torch.zeros(len(cotangents), *leaf.shape, dtype=leaf.dtype,
                       device=leaf.device) if g is None else g


def _one_head_each(grad: Tensor) -> Tensor:
    """(H, *grad.shape): copy h keeps head h of ``grad`` (B, H, L, D) and zeros the rest."""
    heads = grad.shape[1]
    eye = torch.eye(heads, dtype=grad.dtype, device=grad.device)
    return grad.unsqueeze(0) * eye.reshape(heads, 1, heads, 1, 1)


def edge_attribution_patching(model: nn.Module, clean: Inputs, corrupted: Inputs,
                              metric: Metric, *, forward: Forward | None = None,
                              direction: str = "noise", steps: int = 1,
                              mlps: bool = False) -> EdgeScores:
    """EAP: the first-order estimate of patching each edge u -> v of the residual-stream graph
    (see the module docstring for the nodes), from one forward and backward pass on the base
    input and one forward pass on the other.

    ``direction="noise"`` (the paper's): the base run is ``clean`` and each upstream node's
    corrupted output is patched into one downstream input; ``"denoise"``: the reverse. The
    score of u -> v is (out_u(target) - out_u(base)) . d metric / d in_v at the base run, the
    gradient flowing into the residual through head v's own q, k or v projection only
    (``"logits"``: through the final norm and unembedding; an MLP: through its own norm and
    the MLP), summed over batch and positions. ``metric`` and ``forward`` as in
    ``attribution_patching``.

    ``mlps=True`` makes each block's MLP a node too (the standard graph of Syed et al. and
    Hanna et al.): the sender ``"L<l>.MLP"`` (its output, ``blocks.<l>.mlp_out``) after the
    heads of its block, the receiver ``"L<l>.MLP.in"`` (the residual the MLP reads, after
    the block's attention: the input of its norm). Every edge of the graph without MLP nodes
    keeps its score; with them everything that reads the residual is a receiver, so the
    edges out of any sender add up to its AtP score. Blocks without an MLP (attention-only
    models) have no MLP node; a model whose MLP shares its input norm with the attention
    (parallel blocks) is refused.

    ``steps = m`` > 1: integrated gradients, as ``attribution_patching`` does it: the
    gradients into the readers that score the edges out of one writer group (the embeddings;
    the heads of one layer; one MLP) are the mean over the m points k / m, k = 0 .. m - 1, of
    the line from the group's base output to its target output (``hook_heads`` of that layer,
    ``mlp_out`` of that block, or the residual entering block 0, set on the line; everything
    else runs on the base input): (m - 1) x (groups - 1) more EAP passes. 1 is plain EAP."""
    _check_direction(direction)
    _check_steps(steps)
    if not isinstance(mlps, bool):
        raise ValueError(f"mlps must be True or False, got {mlps!r}")
    forward = forward or run_model
    stack = _stack(model, mlps)
    base_inputs, target_inputs = _base_and_target(clean, corrupted, direction)

    target = _Graph(stack, grad=False)
    with torch.no_grad(), target.hooked():
        target_metric = _scalar(metric(_run(model, forward, target_inputs)), "target")
    base = _Graph(stack, grad=True)
    with torch.enable_grad(), base.hooked():
        base_metric = _scalar(metric(_run(model, forward, base_inputs)), "base")
        if not base_metric.requires_grad:
            raise ValueError("the metric does not depend on the model's activations (it "
                             "returned a tensor without a gradient): compute it from the "
                             "logits it is given")
        target.check()
        base.check()
        scores, valid, upstream, downstream = _edge_scores(stack, base, target, base_metric)
    if steps > 1:
        scores = _integrated_edges(forward, base_inputs, metric, stack, base, target, scores,
                                   steps)
    metrics = {"base": float(base_metric.detach()), "target": float(target_metric)}
    clean_value, corrupted_value = ((metrics["target"], metrics["base"]) if direction ==
                                    "denoise" else (metrics["base"], metrics["target"]))
    return EdgeScores(upstream, downstream, scores.detach().cpu(), valid, direction,
                      clean_value, corrupted_value)


def _writers(stack: _Stack) -> list[tuple[str, int, list[str]]]:
    """The writer groups in model order: (kind, block, node names); kind ``"embed"``,
    ``"heads"`` or ``"mlp"``."""
    groups: list[tuple[str, int, list[str]]] = [("embed", -1, ["embed"])]
    for s in stack.model_sites:
        groups.append(("heads", s.layer, [f"L{s.layer}.H{h}" for h in range(s.heads)]))
        if stack.mlp[s.layer] is not None:
            groups.append(("mlp", s.layer, [f"L{s.layer}.MLP"]))
    return groups


def _stage(kind: str, block: int) -> int:
    """Where a node sits in the residual stream: a writer of this stage feeds the readers of
    any later stage (embed 0; block l's heads 2l + 1 and its MLP 2l + 2; a reader of block l's
    heads reads at 2l + 1, of its MLP at 2l + 2, the logits after the last block)."""
    return {"embed": 0, "heads": 2 * block + 1, "mlp": 2 * block + 2}[kind]


def _integrated_edges(forward: Forward, base_inputs: Inputs, metric: Metric, stack: _Stack,
                      base: _Graph, target: _Graph, first: Tensor, steps: int) -> Tensor:
    """EAP scores with each writer group's rows averaged over ``steps`` points of its line
    (``first``: the scores at k = 0, the base run's)."""
    total = first.detach().clone()
    row = 0
    for kind, block, names in _writers(stack):
        rows = slice(row, row + len(names))
        row += len(names)
        if kind == "embed":
            a, b = base.resid.values[0], target.resid.values[0]
        elif kind == "heads":
            a, b = base.points["heads"].values[block], target.points["heads"].values[block]
        else:
            a, b = base.mlp_out.values[block], target.mlp_out.values[block]
        for k in range(1, steps):
            def mix(x: Tensor, a: Tensor = a, b: Tensor = b, alpha: float = k / steps
                    ) -> Tensor:
                return torch.lerp(a.to(x.dtype), b.to(x.dtype), alpha)
            graph = _Graph(stack, grad=True)
            recorder = {"embed": graph.resid, "heads": graph.points["heads"],
                        "mlp": graph.mlp_out}[kind]
            recorder.mix[max(block, 0)] = mix
            with torch.enable_grad(), graph.hooked():
                value = _scalar(metric(_run(stack.model, forward, base_inputs)),
                                "interpolated")
                graph.check()
                scores = _edge_scores(stack, graph, target, value, plain=base)[0]
            total[rows] += scores[rows].detach()
    return total / steps


def _edge_scores(stack: _Stack, base: _Graph, target: _Graph, base_metric: Tensor,
                 plain: _Graph | None = None) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """The EAP scores from the gradients of ``base_metric`` through ``base``'s leaves, the
    output differences from ``target`` minus ``plain`` (default ``base``: the same run)."""
    plain = plain or base
    model_sites = stack.model_sites
    grads = {p: base.points[p].gradients(base_metric) for p in READS}
    (final_grad,) = torch.autograd.grad(base_metric, base.final.leaves[base.last],
                                        retain_graph=True)
    mlp_grads = base.mlp_in.gradients(base_metric) if stack.mlp_layers else {}

    writers = _writers(stack)
    upstream = [name for _, _, names in writers for name in names]
    _check_same_shape("the residual entering block 0", plain.resid.values[0],
                      target.resid.values[0])
    d_embed = _promoted(target.resid.values[0]) - _promoted(plain.resid.values[0])
    deltas: dict[tuple[str, int], Tensor] = {}
    for kind, block, _ in writers[1:]:
        if kind == "heads":
            a, b = target.points["heads"].values[block], plain.points["heads"].values[block]
            what = f"L{block}.heads"
        else:
            a, b = target.mlp_out.values[block], plain.mlp_out.values[block]
            what = f"blocks.{block}.mlp_out"
        _check_same_shape(what, b, a)
        deltas[kind, block] = _promoted(a) - _promoted(b)

    def upstream_scores(cotangents: Tensor, stage: int) -> Tensor:
        """(U, N): the edges from every writer before ``stage`` into N readers whose
        residual-stream gradients are ``cotangents`` (N, B, L, C)."""
        out = cotangents.new_zeros(len(upstream), len(cotangents), dtype=d_embed.dtype)
        out[0] = (_promoted(cotangents) * d_embed).flatten(1).sum(1)
        row = 1
        for kind, block, names in writers[1:]:
            if _stage(kind, block) < stage:
                if kind == "heads":
                    leaf = base.points["heads"].leaves[block]
                    back = _batched_vjp(base.attn_out[block], leaf, cotangents)  # (N,B,L,H,D)
                    per_head = (_promoted(back) * deltas[kind, block]).sum(dim=(1, 2, 4))
                    out[row:row + len(names)] = per_head.T
                else:
                    out[row] = (_promoted(cotangents) * deltas[kind, block]).flatten(1).sum(1)
            row += len(names)
        return out

    columns: list[Tensor] = []
    downstream: list[str] = []
    reach: list[int] = []  # the stage each reader reads at
    for s in model_sites:
        leaf = base.resid.leaves[s.layer]
        for p in READS:
            out = base.points[p].outputs[s.layer]
            heads = out.shape[1]
            into_resid = _batched_vjp(out, leaf, _one_head_each(grads[p][s.layer]))
            columns.append(upstream_scores(into_resid, _stage("heads", s.layer)))
            downstream += [f"L{s.layer}.H{h}.{p}" for h in range(heads)]
            reach += [_stage("heads", s.layer)] * heads
        if stack.mlp[s.layer] is not None:
            columns.append(upstream_scores(mlp_grads[s.layer].unsqueeze(0),
                                           _stage("mlp", s.layer)))
            downstream.append(f"L{s.layer}.MLP.in")
            reach.append(_stage("mlp", s.layer))
    logits_stage = _stage("mlp", stack.blocks - 1) + 1
    columns.append(upstream_scores(final_grad.unsqueeze(0), logits_stage))
    downstream.append("logits")
    reach.append(logits_stage)
    scores = torch.cat(columns, dim=1)
    writer_stage = torch.tensor([_stage(kind, block) for kind, block, names in writers
                                 for _ in names])
    valid = writer_stage[:, None] < torch.tensor(reach)[None, :]
    return scores.masked_fill(~valid.to(scores.device), 0.0), valid, upstream, downstream


# ------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Agreement:
    """How well two score tensors agree: Spearman's rank correlation over the entries both
    hold (not NaN), the share of the ``k`` largest (by absolute value) they have in common,
    and the number of entries compared."""

    spearman: float
    top_k_overlap: float
    k: int
    entries: int


def agreement(estimate: PatchScores | Tensor, reference: PatchScores | Tensor, *,
              k: int = 5) -> Agreement:
    """Compare an estimate (AtP, EAP) with the reference (activation or path patching):
    Spearman over the entries both define and the top-``k`` overlap by absolute score."""
    from attnlab.heads.importance import rank_correlation

    a = estimate.scores if isinstance(estimate, PatchScores) else estimate
    b = reference.scores if isinstance(reference, PatchScores) else reference
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)} (compare "
                         "scores of the same point, axes and model)")
    keep = ~(a.isnan() | b.isnan())
    entries = int(keep.sum())
    if entries < 2:
        raise ValueError("fewer than two entries to compare")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, entries)
    fa, fb = a[keep].double(), b[keep].double()
    top_a = set(fa.abs().argsort(descending=True, stable=True)[:k].tolist())
    top_b = set(fb.abs().argsort(descending=True, stable=True)[:k].tolist())
    return Agreement(rank_correlation(fa, fb), len(top_a & top_b) / k, k, entries)
