"""Attention transfer: train a converted model's new attention parameters to mimic softmax.

After ``convert(model, mechanism)`` each attention layer holds the pretrained q, k, v and
output projections plus the mechanism's own, newly initialised parameters (feature maps,
gates, temperatures). :func:`attention_transfer` trains only those new parameters so that
every converted layer reproduces the frozen softmax layer it replaced:

- ``loss="hedgehog"`` (Zhang et al., "The Hedgehog & the Porcupine", 2024): the
  cross-entropy from the teacher's softmax weights to the student's weights, row by row,
  -sum_j t_ij log s_ij, averaged over the real query rows of every head. Needs a mechanism
  that defines its attention matrix (``attnlab info NAME``: weights).
- ``loss="lolcats"`` (Zhang et al., "LoLCATs", 2024): the mean squared error between the
  layer's output (after the output projection) and the teacher layer's, over real tokens
  and channels. Works for every mechanism.
- ``loss="auto"``: hedgehog where the mechanism's weights give its output exactly (output =
  weights @ values: ``Attention.weights_reproduce_output``), depend on every new
  parameter and are distributions (non-negative, every row summing to 1), all three checked
  on a probe of random tokens; lolcats otherwise (no weights, a term beside them as InLine's
  and Agent's, an output gate as Gated Attention's, which the weights do not see, or weights
  that are not distributions, as linear attention's with the identity feature map, for
  which the cross-entropy is unbounded below: ``loss="hedgehog"`` refuses those).
  A new parameter the chosen loss does not reach is listed in
  ``TransferLog.untrained``, with a warning.

Teacher forcing, as both papers do: each batch runs once through the frozen model (the
kept teacher modules put back in place, eval mode, no gradient); every converted layer
receives the hidden states the frozen model feeds that layer, never its own student's
outputs, and its loss is back-propagated at once (its graph freed before the next layer
runs). The teacher's weights and outputs for the loss are those of softmax attention on the
same pretrained projections and RoPE (equal to the Hugging Face module's to float32
rounding: tests/integrations/test_distill.py compares them with the eager attention
weights of the unconverted model).

All selected layers train together, one optimizer step per batch. With teacher forcing a
layer's loss depends only on its own parameters and on inputs that no other student layer
produces, and AdamW acts coordinate by coordinate, so training them together gives the
same parameters as training them one after another on the same batches, at the cost of one
frozen forward per batch instead of one per layer.

Any model whose attention modules are ``ConvertedAttention`` with a kept teacher works, not
only ``convert``'s Hugging Face models: ``attnlab.heads.studies.conversion`` wraps an attnlab
``TransformerLM`` moved onto another mechanism that way (its teacher: the softmax
``TransformerLM``'s attention of the same block), and a tensor batch goes to a forward
without ``input_ids`` positionally. ``layers=[i, ...]`` trains a subset (the
forward stops after the last of them).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import attnlab.mechanisms  # noqa: F401  (registers the built-in mechanisms)
from attnlab.core.registry import build
from attnlab.files import write_atomic
from attnlab.integrations.convert import ConvertedAttention, converted_modules, new_parameters
from attnlab.mechanisms.base import Attention

__all__ = ["LOSSES", "TransferLog", "attention_transfer", "checkpoint_step",
           "evaluate_transfer", "loss_refusal", "past_steps", "teacher_mode"]

LOSSES = ("auto", "hedgehog", "lolcats")
CHECKPOINT_FORMAT = "attnlab.attention_transfer/1"
LOG_FLOOR = 1e-12  # the student's weights are clamped here before the log (an exact 0)

Batch = Tensor | Mapping[str, Tensor]


# ---------------------------------------------------------------------------- the log
@dataclass
class TransferLog:
    """What :func:`attention_transfer` did.

    ``losses[layer][step]`` is the loss of converted layer ``layer`` on the batch of
    ``step`` (0-based), measured before that step's update; ``loss`` is "hedgehog" or
    "lolcats"; ``untrained`` lists new parameters the loss does not reach (no gradient, e.g.
    an output gate under the hedgehog loss, which reads only the weights);
    ``resumed_from``: the step of the checkpoint the run continued from (None: a fresh
    start); ``seconds``: wall time of this call."""

    loss: str
    layers: list[int]
    steps: int = 0
    losses: dict[int, list[float]] = field(default_factory=dict)
    untrained: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0

    def first(self) -> dict[int, float]:
        """Each layer's loss at the first step."""
        return {layer: values[0] for layer, values in self.losses.items() if values}

    def last(self) -> dict[int, float]:
        """Each layer's loss at the last step."""
        return {layer: values[-1] for layer, values in self.losses.items() if values}

    def mean(self, step: int) -> float:
        """The loss of ``step`` averaged over the layers."""
        return sum(v[step] for v in self.losses.values()) / max(1, len(self.losses))

    def __str__(self) -> str:
        rows = [f"attention transfer ({self.loss} loss), {self.steps} steps"
                + (f", resumed from step {self.resumed_from}" if self.resumed_from else "")]
        first, last = self.first(), self.last()
        rows += [f"  layer {layer}: {first[layer]:.4g} -> {last[layer]:.4g}" for layer in last]
        return "\n".join(rows)


# ------------------------------------------------------------------- the frozen model
@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the kept teacher modules (the replaced Hugging Face attention, and BERT's output
    dense) back in place for the duration of the block: the model is then the unconverted
    model (it shares the pretrained weights). Restores the converted modules on exit, also
    after an error. ValueError when the model is not converted or a teacher was not kept
    (``convert(..., keep_teacher=False)``)."""
    found = converted_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no converted attention (run convert "
                         "first)")
    swaps: list[tuple[str, nn.Module]] = []  # path -> the module to put there
    for path, module in found:
        if module.teacher is None:
            raise ValueError(f"{path}: the teacher was not kept (convert(..., "
                             "keep_teacher=True) is needed for attention transfer and for "
                             "distilling from the converted model's own teacher)")
        swaps.append((path, module.teacher))
        swaps += list(module.teacher_parts.items())
    saved = [(path, model.get_submodule(path)) for path, _ in swaps]
    try:
        for path, teacher in swaps:
            _put(model, path, teacher)
        yield model
    finally:
        for path, current in saved:
            _put(model, path, current)


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def softmax_twin(attn: Attention) -> Attention:
    """Softmax attention on ``attn``'s pretrained q, k, v, o and RoPE (the same modules,
    shared, not copied): the frozen layer a converted module replaced, in attnlab's form."""
    qkv = attn.qkv
    maps = [getattr(qkv, name, None) for name in ("q", "k", "v")]
    if not all(isinstance(m, nn.Linear) for m in maps) or not isinstance(attn.o_proj,
                                                                         nn.Linear):
        raise ValueError(f"{attn.name}: no plain q, k, v, o projections to rebuild the "
                         "softmax teacher from")
    weight = attn.o_proj.weight
    with torch.device("meta"):
        twin = build("softmax", dim=attn.dim, heads=attn.heads, kv_heads=attn.kv_heads,
                     head_dim=attn.head_dim, causal=attn.causal, rope=attn.uses_rope)
    twin = twin.to_empty(device=weight.device).to(weight.dtype)
    twin.head_scale.fill_(1.0)
    for name, m in zip(("q", "k", "v"), maps, strict=True):
        setattr(twin.qkv, name, m)
    twin.o_proj = attn.o_proj
    if attn.uses_rope:
        twin.rotary = attn.rotary
    return twin.eval()


# ------------------------------------------------------------------------ the losses
def _real_rows(keep: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(B, L) True where a query token is real."""
    if keep is None:
        return torch.ones(shape[0], shape[1], dtype=torch.bool, device=device)
    return keep


def hedgehog_loss(teacher: Tensor, student: Tensor, keep: Tensor | None, *,
                  kl: bool = False) -> Tensor:
    """Mean over real query rows (of every head) of -sum_j t_ij log s_ij; ``teacher`` and
    ``student`` (B, H, Lq, Lk), ``keep`` (B, Lq) or None. Rows with no visible key (a padded
    query) are left out. ``kl``: minus the teacher's entropy, i.e. KL(t || s) (0 when the
    student's weights are the teacher's; the same gradient)."""
    t, s = teacher.float(), student.float()
    ce = -(t * torch.log(s.clamp_min(LOG_FLOOR))).sum(-1)  # (B, H, Lq)
    if kl:
        ce = ce + torch.xlogy(t, t).sum(-1)
    rows = _real_rows(keep, (t.shape[0], t.shape[2]), t.device)[:, None, :] \
        & (t.sum(-1) > 0)
    return ce[rows].mean() if bool(rows.any()) else ce.sum() * 0


def lolcats_loss(teacher: Tensor, student: Tensor, keep: Tensor | None) -> Tensor:
    """Mean squared error over the real tokens and channels; ``teacher`` and ``student``
    (B, L, C)."""
    diff = (student.float() - teacher.float()).pow(2)
    rows = _real_rows(keep, (diff.shape[0], diff.shape[1]), diff.device)
    return diff[rows].mean() if bool(rows.any()) else diff.sum() * 0


# ------------------------------------------------------------------ one teacher pass
class _Stop(Exception):
    """Raised after the last selected layer: the rest of the frozen forward is not needed."""


def _model_inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, Tensor):
        inputs: dict[str, Any] = {"input_ids": batch}
    elif isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
    else:
        raise ValueError(f"a batch must be a tensor of token ids or a mapping of model inputs "
                         f"(input_ids, attention_mask, ...), got {type(batch).__name__}")
    moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    moved.setdefault("use_cache", False)
    return moved


def _call(model: nn.Module, batch: Batch) -> Any:
    """``model`` on ``batch``: a Hugging Face model by keyword (``input_ids``, ...); a model
    whose forward takes no ``input_ids`` (an attnlab ``TransformerLM``: ``tokens``) gets a
    tensor batch positionally."""
    device = _device(model)
    if isinstance(batch, Tensor) and \
            "input_ids" not in inspect.signature(model.forward).parameters:
        return model(batch.to(device))
    return model(**_model_inputs(batch, device))


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class _Layer:
    index: int
    path: str
    module: ConvertedAttention
    twin: Attention
    loss: str


def _layer_loss(layer: _Layer, x: Tensor, kwargs: dict[str, Any], kl: bool = False
                ) -> Tensor:
    """The student's loss on the teacher-forced input ``x`` of one layer."""
    seen: dict[str, Any] = {}

    def grab(_: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen["x"], seen["mask"] = args[0], kw.get("mask")

    handle = layer.module.attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        # the converted module's own call: the teacher's keyword arguments (masks, positions)
        # go through the same checks and mask reading as in the converted model
        if layer.loss == "lolcats":
            out = layer.module(x, **kwargs)[0]
        else:
            with torch.no_grad():
                layer.module(x, **kwargs)
    finally:
        handle.remove()
    inner, keep = seen["x"], seen["mask"]
    with torch.no_grad():
        if layer.loss == "lolcats":
            target = layer.twin(inner, mask=keep)
        else:
            target = layer.twin.weights(inner, mask=keep)
    if layer.loss == "lolcats":
        return lolcats_loss(target, out, keep)
    return hedgehog_loss(target, layer.module.attn.weights(inner, mask=keep), keep, kl=kl)


def _teacher_pass(model: nn.Module, layers: list[_Layer], batch: Batch, *,
                  backward: bool, kl: bool = False) -> dict[int, float]:
    """One frozen forward of ``batch``; each selected layer's loss on its teacher-forced
    input (back-propagated when ``backward``). Returns the losses by layer."""
    by_teacher = {id(layer.module.teacher): layer for layer in layers}
    last = max(layer.index for layer in layers)
    losses: dict[int, float] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             output: Any) -> None:
        layer = by_teacher[id(module)]
        x = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        with torch.enable_grad() if backward else torch.no_grad():
            loss = _layer_loss(layer, x.detach(), rest, kl)
            if backward and loss.requires_grad:
                loss.backward()
        losses[layer.index] = float(loss.detach())
        if layer.index == last:
            raise _Stop

    handles = []
    with teacher_mode(model):
        try:
            for layer in layers:
                assert layer.module.teacher is not None
                handles.append(layer.module.teacher.register_forward_hook(hook,
                                                                          with_kwargs=True))
            with torch.no_grad():
                _call(model, batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    missing = [layer.index for layer in layers if layer.index not in losses]
    if missing:
        raise ValueError(f"the forward pass never reached converted layer(s) {missing}")
    return losses


# --------------------------------------------------------------------- shared helpers
def _chosen_layers(model: nn.Module, layers: str | Sequence[int]
                   ) -> list[tuple[int, str, ConvertedAttention]]:
    found = converted_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no converted attention (run convert "
                         "first)")
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer indices, got {layers!r}")
        chosen = list(range(len(found)))
    else:
        chosen = sorted({int(i) for i in layers})
        bad = [i for i in chosen if not 0 <= i < len(found)]
        if bad or not chosen:
            raise ValueError(f"layers {bad or '[]'} out of range: the model has {len(found)} "
                             f"converted layers (0..{len(found) - 1})")
    return [(i, *found[i]) for i in chosen]


def _resolve_loss(loss: str, module: ConvertedAttention) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    meta = module.attn.mechanism
    has_weights = bool(meta.weights) if meta is not None else True
    if loss == "auto":  # the weights say everything about the output only when exact
        exact = has_weights and bool(module.attn.weights_reproduce_output)
        return "hedgehog" if exact and _weights_reach_all(module) and \
            _not_a_distribution(module) is None else "lolcats"
    if loss == "hedgehog":
        if not has_weights:
            raise ValueError(f"loss='hedgehog' compares attention weights, which "
                             f"{module.attn.name} does not define; use loss='lolcats' (layer "
                             "outputs)")
        why = _not_a_distribution(module)
        if why is not None:
            raise ValueError(f"loss='hedgehog' is a cross-entropy between attention "
                             f"distributions, and {module.attn.name}'s weights are not one "
                             f"({why}, on a probe of random tokens): its minimum says nothing "
                             "about the output; use loss='lolcats' (layer outputs)")
    return loss


def _probe(attn: Attention) -> tuple[Tensor, torch.Generator]:
    """Random probe tokens (1, 5, dim) on the device and in the dtype of ``attn``'s
    parameters, and the generator that drew them (seeded: the same probe every call)."""
    first = next(attn.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, attn.dim, generator=gen).to(first.device, first.dtype)
    return x, gen


def _not_a_distribution(module: ConvertedAttention) -> str | None:
    """None when the weights of the converted ``module`` are non-negative and every query
    row sums to 1 on a probe of random tokens (within the square root of the dtype's
    epsilon); otherwise what is wrong with them (e.g. linear attention with the identity
    feature map: negative weights, rows not normalised)."""
    attn = module.attn
    x, _ = _probe(attn)
    with torch.no_grad():
        w = attn.weights(x).float()
    tol = torch.finfo(x.dtype).eps ** 0.5
    low = float(w.min())
    sums = w.sum(-1)
    worst = float((sums - 1).abs().max())
    wrong = []
    if low < -tol:
        wrong.append(f"a weight of {low:.3g}")
    if worst > tol:
        wrong.append(f"a row summing to {float(sums.flatten()[(sums - 1).abs().argmax()]):.4g}")
    return " and ".join(wrong) if wrong else None


def _weights_reach(module: ConvertedAttention) -> dict[str, bool]:
    """For each new parameter of the converted ``module`` (by its name in ``module.attn``):
    whether the attention weights depend on it (a probe on a few random tokens; a gate on
    the output, for one, is not reached)."""
    attn = module.attn
    new = {n: p for n, p in attn.named_parameters() if n not in module.pretrained}
    if not new:
        return {}
    x, gen = _probe(attn)
    with torch.enable_grad():
        w = attn.weights(x)
        probe = (w.float() * torch.randn(w.shape, generator=gen).to(w.device)).sum()
        if not probe.requires_grad:
            return dict.fromkeys(new, False)
        grads = torch.autograd.grad(probe, list(new.values()), allow_unused=True)
    return {n: g is not None for n, g in zip(new, grads, strict=True)}


def _weights_reach_all(module: ConvertedAttention) -> bool:
    """Whether the attention weights depend on every new parameter of ``module``."""
    return all(_weights_reach(module).values())


def _prepare(model: nn.Module, loss: str, layers: str | Sequence[int]
             ) -> tuple[list[_Layer], dict[str, nn.Parameter]]:
    chosen = _chosen_layers(model, layers)
    new = new_parameters(model)
    prefixes = tuple(f"{path}.attn." if path else "attn." for _, path, _ in chosen)
    params = {n: p for n, p in new.items() if n.startswith(prefixes)}
    if not params:
        name = chosen[0][2].attn.name
        raise ValueError(f"{name} has no new parameters in the converted layers "
                         f"{[i for i, _, _ in chosen]}: its attention is computed from the "
                         "pretrained projections alone, so attention transfer has nothing "
                         "to train (fine-tune instead)")
    built = []
    for index, path, module in chosen:
        if module.teacher is None:
            raise ValueError(f"{path}: the teacher was not kept (convert(..., "
                             "keep_teacher=True) is needed for attention transfer)")
        built.append(_Layer(index, path, module, softmax_twin(module.attn),
                            _resolve_loss(loss, module)))
    if all(layer.loss == "hedgehog" for layer in built) and \
            not any(any(_weights_reach(layer.module).values()) for layer in built):
        raise ValueError(_unreached(built[0].module))
    return built, params


def _unreached(module: ConvertedAttention) -> str:
    """The refusal of the hedgehog loss when no new parameter of ``module``'s mechanism
    changes its attention weights (named within the layer: the same in every layer)."""
    names = sorted(n for n, p in module.attn.named_parameters() if n not in module.pretrained)
    return (f"loss='hedgehog' reads the attention weights, and none of {module.attn.name}'s "
            f"new parameters ({', '.join(names[:3])}{'...' if len(names) > 3 else ''}) "
            "changes them (on a probe of random tokens): nothing would train; use "
            "loss='lolcats' (layer outputs)")


def loss_refusal(module: ConvertedAttention, loss: str) -> str | None:
    """Why :func:`attention_transfer` with ``loss`` refuses a model whose converted layers
    are as ``module`` is (the message of its ValueError), or None when that loss can train
    the layer's new parameters: an unknown loss; "hedgehog" for a mechanism without weights,
    with weights that are not distributions or that no new parameter changes (a mechanism
    without new parameters is refused by attention_transfer as having nothing to train, not
    here: None). Decided by
    probes of random tokens through ``module`` alone, so a stand-in layer of the model's
    shape answers before the pretrained weights are read (``attnlab convert hf`` does)."""
    try:
        chosen = _resolve_loss(loss, module)
    except ValueError as err:
        return str(err)
    reach = _weights_reach(module)
    if chosen == "hedgehog" and reach and not any(reach.values()):
        return _unreached(module)
    return None


@contextlib.contextmanager
def _only_trainable(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """requires_grad only on ``params`` (the teacher modules' too are off), restored on
    exit."""
    keep = {id(p) for p in params}
    everything = {id(p): p for p in model.parameters()}
    for _, module in converted_modules(model):
        for part in [module.teacher, *module.teacher_parts.values()]:
            if part is not None:
                everything.update({id(p): p for p in part.parameters()})
    saved = {i: p.requires_grad for i, p in everything.items()}
    try:
        for i, p in everything.items():
            p.requires_grad_(i in keep)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for i, p in everything.items():
            p.requires_grad_(saved[i])


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restores every module's training flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def _rng_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The caller's random state is saved and restored around the run."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "get_rng_state"):
        state["device"] = backend.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    backend = getattr(torch, device.type, None)
    if "device" in state and backend is not None and hasattr(backend, "set_rng_state"):
        backend.set_rng_state(state["device"], device)


class _Cursor:
    """Batches from ``data``, pass after pass for a re-iterable ``data``; ``position`` =
    (pass, batches used in this pass), from which :meth:`skip_to` resumes."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        self.one_shot = iter(data) is data
        self.epoch, self.index = 0, 0
        self._it: Iterator[Any] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def skip_to(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, 0
        if self.one_shot:
            warnings.warn("the data is a one-shot iterator: its position cannot be restored, "
                          "so the resumed run reads on from where the iterator stands",
                          stacklevel=3)
            self.index = index
            return
        self._it = iter(self.data)
        for _ in range(index):
            if next(self._it, _END) is _END:
                raise ValueError(f"cannot resume: the data ended after {self.index} batches, "
                                 f"the checkpoint had used {index} of this pass (did the data "
                                 "change?)")
            self.index += 1

    def next(self) -> Any:
        """The next batch, or ``_END`` when a one-shot iterator is exhausted."""
        if self._it is None:
            self._it = iter(self.data)
        batch = next(self._it, _END)
        if batch is _END:
            if self.one_shot:
                return _END
            if self.index == 0:
                raise ValueError("the data gives no batches")
            self.epoch, self.index = self.epoch + 1, 0
            self._it = iter(self.data)
            batch = next(self._it, _END)
            if batch is _END:
                raise ValueError("the data gave no batches on a new pass over it")
        self.index += 1
        return batch


_END = object()


def _save(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through ``attnlab.files.write_atomic``: a reader (a resumed run) sees the
    previous checkpoint or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def checkpoint_step(path: str | Path) -> int | None:
    """The step stored in the training checkpoint at ``path`` (written by
    :func:`attention_transfer` or ``attnlab.integrations.finetune.finetune``), read without
    loading its tensors into memory; None when there is no such file or it cannot be read as
    one (resuming from it then says why)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = payload["step"]
    except Exception:  # noqa: BLE001  (not a checkpoint: the run that reads it will tell)
        return None
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return step


def past_steps(path: str | Path, step: int, steps: int, option: str = "steps") -> str | None:
    """Why a checkpoint at ``path`` holding ``step`` cannot resume a run of ``steps`` steps
    (it is past them), or None when it can: the one refusal of :func:`attention_transfer`,
    ``finetune`` and ``attnlab convert hf --checkpoint``. ``option`` names the setting in
    the caller's words: ``"steps"`` (written ``steps=N``) or a command-line option such as
    ``"--steps"`` (written ``--steps N``)."""
    if step <= steps:
        return None

    def said(value: int) -> str:
        return f"{option} {value}" if option.startswith("--") else f"{option}={value}"

    return (f"{path} is at step {step}, beyond {said(steps)}: pass {said(step)} or more, "
            "or start from another checkpoint")


def _resume(path: Path, kind: str, config: dict[str, Any],
            params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer,
            cursor: _Cursor, device: torch.device, steps: int) -> dict[str, Any]:
    """Load the checkpoint at ``path`` (of format ``kind``, written by ``_checkpoint`` for
    the same ``config``) into ``params``, ``optimizer``, the random state and ``cursor``;
    its payload (``step``, ``log``). ValueError if it is past ``steps``."""
    payload = _load(path, kind, config, params)
    why = past_steps(path, int(payload["step"]), steps)
    if why is not None:
        raise ValueError(why)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(payload["params"][name])
    optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(payload["rng"], device)
    cursor.skip_to(*payload["position"])
    return payload


def _checkpoint(path: Path, kind: str, config: dict[str, Any], step: int,
                params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                cursor: _Cursor, device: torch.device, losses: Any) -> None:
    """Everything ``_resume`` needs to continue after ``step``, written atomically."""
    _save(path, {"format": kind, "config": config, "step": step,
                 "params": {n: p.detach().cpu() for n, p in params.items()},
                 "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                 "position": cursor.position, "log": {"losses": losses}})


def _load(path: Path, kind: str, config: dict[str, Any],
          params: Mapping[str, nn.Parameter]) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint")
    differ = {k: (payload["config"].get(k), v) for k, v in config.items()
              if payload["config"].get(k) != v}
    if differ:
        said = ", ".join(f"{k}={old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(f"{path} was written by another run ({said}): pass another "
                         "checkpoint path or resume=False")
    saved = payload["params"]
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    if {n: tuple(t.shape) for n, t in saved.items()} != shapes:
        raise ValueError(f"{path} holds other parameters than this model trains "
                         f"({sorted(saved)[:3]}... against {sorted(shapes)[:3]}...)")
    return payload


PLAIN_EVERY_S = 60.0  # off a terminal: a progress line at least this often (seconds) ...
PLAIN_PARTS = 10  # ... and at every tenth of the steps


@contextlib.contextmanager
def _bar(enabled: bool, total: int, done: int, what: str
         ) -> Iterator[Callable[[str], None]]:
    """Progress of a training loop; yields ``advance(description)``, called after each
    step. A header line (``what``, the steps, the step resumed from) comes first; then a
    rich progress bar on a terminal, or, when the console is not one (a log file under
    nohup or a batch scheduler, where a bar shows nothing until it ends), a plain line at
    every tenth of the steps and at least every ``PLAIN_EVERY_S`` seconds, and at the
    last step."""
    if not enabled:
        yield lambda text: None
        return
    from rich import progress as rp
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    console.print(escape(f"{what}: {total:,} steps"
                         + (f", resuming from step {done:,}" if done else "")), highlight=False)
    if not console.is_terminal:
        start = last = time.monotonic()
        step = done
        part = max(1, total // PLAIN_PARTS)

        def line(text: str) -> None:
            nonlocal last, step
            step += 1
            now = time.monotonic()
            if step % part == 0 or step == total or now - last >= PLAIN_EVERY_S:
                last = now
                console.print(escape(f"{what}: step {step:,}/{total:,}, {text}, "
                                     f"{now - start:.0f} s"), highlight=False)

        yield line
        return
    with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                     rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                     rp.TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(what, total=total, completed=done)
        yield lambda text: bar.update(task, advance=1, description=f"{what} {text}")


def _check_training_arguments(steps: int, lr: float, every: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")


# -------------------------------------------------------------------------- the API
def attention_transfer(model: nn.Module, data: Iterable[Batch], *,
                       loss: Literal["auto", "hedgehog", "lolcats"] | str = "auto",
                       steps: int = 100, lr: float = 1e-2,
                       layers: str | Sequence[int] = "all",
                       checkpoint: str | Path | None = None, every: int = 50,
                       resume: bool = True, progress: bool = True,
                       seed: int = 0) -> TransferLog:
    """Train the new attention parameters of a converted model to mimic the frozen softmax
    layers (in place); returns the per-step losses of every layer.

    ``data``: batches of token ids (B, L) or mappings of model inputs (``input_ids``,
    ``attention_mask``, ...; ``labels`` are ignored), read pass after pass until ``steps``
    batches are used (a one-shot iterator ends the run early, with a warning). ``loss``:
    "hedgehog" (cross-entropy on the attention weights), "lolcats" (MSE on the layer
    outputs) or "auto" (hedgehog where the weights give the output exactly, see every
    new parameter and are distributions). Only
    ``new_parameters(model)`` of the chosen ``layers`` train (AdamW, ``lr``, no weight
    decay); the pretrained projections, the rest of the model and the teacher modules stay
    as they are. The student layers run in the mode the model is in (``model.train()``
    applies their dropout; ``seed`` seeds it, the caller's random state is restored after);
    the frozen pass always runs in eval mode.

    ``checkpoint``: a file written every ``every`` steps and at the end (atomically) with
    the new parameters, the optimizer, the step, the random state and the data position;
    with ``resume`` an existing one is loaded and the run continues to the result an
    uninterrupted run gives (the data must yield the same batches when iterated again).
    A checkpoint of another run (loss, lr, layers, mechanism, seed) is refused.

    ValueError: a model that is not converted or whose teachers were not kept, a mechanism
    with no new parameters (nothing to train), loss="hedgehog" for a mechanism without
    weights or whose weights are not distributions, bad ``layers``/``steps``/``lr``/``every``.
    """
    _check_training_arguments(steps, lr, every)
    chosen, params = _prepare(model, loss, layers)
    device = _device(model)
    losses = sorted({layer.loss for layer in chosen})
    log = TransferLog(loss=losses[0] if len(losses) == 1 else "+".join(losses),
                      layers=[layer.index for layer in chosen],
                      losses={layer.index: [] for layer in chosen})
    config = {"loss": log.loss, "lr": float(lr), "layers": log.layers, "seed": int(seed),
              "mechanism": chosen[0].module.attn.name}
    path = None if checkpoint is None else Path(checkpoint)
    start = time.perf_counter()
    student_modes = {layer.index: layer.module.training for layer in chosen}
    with _rng_context(device), _modes_kept(model), _only_trainable(model, params.values()):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
        cursor = _Cursor(data)
        step = 0
        if path is not None and resume and path.exists():
            payload = _resume(path, CHECKPOINT_FORMAT, config, params, optimizer, cursor,
                              device, steps)
            step = log.resumed_from = int(payload["step"])
            log.losses = {int(k): list(v) for k, v in payload["log"]["losses"].items()}
        model.eval()
        for layer in chosen:
            layer.module.train(student_modes[layer.index])
        reached: set[str] = set()
        names = {id(p): n for n, p in params.items()}
        with _bar(progress, steps, step, f"attention transfer ({log.loss} loss)") as advance:
            while step < steps:
                batch = cursor.next()
                if batch is _END:
                    warnings.warn(f"the data ended after {step} of {steps} steps",
                                  stacklevel=2)
                    break
                optimizer.zero_grad(set_to_none=True)
                got = _teacher_pass(model, chosen, batch, backward=True)
                reached.update(names[id(p)] for p in params.values() if p.grad is not None)
                optimizer.step()
                step += 1
                for index, value in got.items():
                    log.losses[index].append(value)
                advance(f"loss {sum(got.values()) / len(got):.4g}")
                if path is not None and (step % every == 0 or step == steps):
                    _checkpoint(path, CHECKPOINT_FORMAT, config, step, params, optimizer,
                                cursor, device, log.losses)
        optimizer.zero_grad(set_to_none=True)
    log.steps = step
    if step > (log.resumed_from or 0):
        log.untrained = sorted(n for n in params if n not in reached)
        if log.untrained:
            hint = "; loss='lolcats' (layer outputs) trains them" \
                if "lolcats" not in log.loss else ""
            warnings.warn(f"the {log.loss} loss does not reach {len(log.untrained)} of "
                          f"{len(params)} new parameters ({', '.join(log.untrained[:3])}"
                          f"{'...' if len(log.untrained) > 3 else ''}), which stayed as "
                          f"initialised{hint}", stacklevel=2)
    log.seconds = time.perf_counter() - start
    return log


def evaluate_transfer(model: nn.Module, data: Iterable[Batch], *,
                      loss: Literal["auto", "hedgehog", "lolcats"] | str = "auto",
                      layers: str | Sequence[int] = "all", kl: bool = False
                      ) -> dict[int, float]:
    """The attention-transfer loss of each converted layer averaged over the batches of
    ``data`` (one pass; teacher-forced, as in training; no parameter changes): e.g. on
    held-out text before and after :func:`attention_transfer`. ``kl``: for the hedgehog
    loss, KL(teacher || student) instead of the cross-entropy (the cross-entropy less the
    teacher's entropy: 0 for a perfect student)."""
    chosen, _ = _prepare(model, loss, layers)
    totals: dict[int, float] = {layer.index: 0.0 for layer in chosen}
    count = 0
    with _modes_kept(model):
        model.eval()
        for batch in data:
            for index, value in _teacher_pass(model, chosen, batch, backward=False,
                                                kl=kl).items():
                totals[index] += value
            count += 1
    if not count:
        raise ValueError("the data gives no batches")
    return {index: total / count for index, total in totals.items()}

