"""Fine-tuning a converted model after attention transfer, in full or with LoRA.

:func:`finetune` trains a converted transformers model on one of three objectives:

- ``"lm"``: the model's own task loss: the batch's ``labels`` when it has them (a
  classification head, masked-LM labels), otherwise next-token prediction on ``input_ids``
  (padding left out), for models that compute a loss from ``labels``;
- ``"logits"``: distillation of the teacher's output distribution, KL(teacher || student)
  of the softmax of the logits, per real token, averaged;
- ``"hidden"``: distillation of the final hidden states, the mean squared error over real
  tokens and channels (for models without logits, e.g. BERT's encoder).

The teacher is a module given as ``teacher=`` (e.g. the model before ``convert``) or, when
None, the converted model itself with its kept teacher attention modules put back in place
(:func:`attnlab.integrations.distill.teacher_mode`): the original model, at no extra memory.

``lora=r`` trains LoRA adapters of rank r (through ``peft``, an optional dependency:
``pip install peft``) on the pretrained q, k, v and output projections of every converted
layer, plus the mechanism's new parameters in full (as LoLCATs' second stage); everything
else stays frozen. Without ``lora`` every parameter that requires a gradient trains. The
adapters stay in the model after the call; :func:`merge_lora` folds them into the weights.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.integrations.convert import converted_modules
from attnlab.integrations.distill import (
    _END,
    Batch,
    _bar,
    _check_training_arguments,
    _checkpoint,
    _Cursor,
    _device,
    _model_inputs,
    _modes_kept,
    _put,
    _resume,
    _rng_context,
    teacher_mode,
)

__all__ = ["OBJECTIVES", "FinetuneLog", "finetune", "lora_parameters", "merge_lora",
           "require_peft"]

OBJECTIVES = ("lm", "logits", "hidden")
CHECKPOINT_FORMAT = "attnlab.finetune/1"
ADAPTER = "default"  # peft's adapter name


@dataclass
class FinetuneLog:
    """What :func:`finetune` did: ``losses[step]`` (the objective on that step's batch,
    before the update), how many parameter elements trained (``trainable``), the LoRA rank
    (None: full fine-tuning), the step a resumed run continued from, wall time."""

    objective: str
    lora: int | None
    trainable: int = 0
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        how = f"LoRA rank {self.lora} + new parameters" if self.lora else "full"
        first = f"{self.losses[0]:.4g}" if self.losses else "-"
        last = f"{self.losses[-1]:.4g}" if self.losses else "-"
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from else ""
        return (f"fine-tuning ({self.objective}, {how}, {self.trainable:,} trained values): "
                f"{self.steps} steps{resumed}, loss {first} -> {last}")


# ---------------------------------------------------------------------------- peft
def require_peft() -> Any:
    """The ``peft`` module, or ImportError with the install hint."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA fine-tuning needs peft: pip install peft (or "
                          "pip install 'attnlab[lora]')") from err
    return peft


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA adapter parameters in ``model`` (empty when it has none)."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def _pretrained_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The mechanisms' own parameters, also in a model with LoRA adapters (whose wrapped
    projections rename the pretrained parameters ``*.base_layer.*``)."""
    out: dict[str, nn.Parameter] = {}
    for path, module in converted_modules(model):
        prefix = f"{path}.attn." if path else "attn."
        for name, p in module.attn.named_parameters():
            if ".lora_" in f".{name}" or _pretrained_name(name) in module.pretrained:
                continue
            out[prefix + name] = p
    return out


def _targets(model: nn.Module) -> list[str]:
    """The module names of the pretrained q, k, v, o projections of the converted layers."""
    names = []
    for path, module in converted_modules(model):
        prefix = f"{path}.attn." if path else "attn."
        for part in ("qkv.q", "qkv.k", "qkv.v", "o_proj"):
            if f"{part}.weight" in module.pretrained:
                names.append(prefix + part)
    return names


def _add_lora(model: nn.Module, rank: int, alpha: float | None) -> None:
    existing = _lora_layers(model)
    if existing:
        ranks = {int(m.r[ADAPTER]) for _, m in existing if ADAPTER in m.r}
        if ranks != {rank}:
            raise ValueError(f"the model already holds LoRA adapters of rank {sorted(ranks)}, "
                             f"not {rank} (merge_lora first, or pass lora={sorted(ranks)[0]})")
        return
    targets = _targets(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no converted attention whose pretrained "
                         "q, k, v, o LoRA could adapt (run convert first)")
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                             lora_dropout=0.0, target_modules=targets, bias="none")
    peft.inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA adapters into the projections they adapt and put plain ``nn.Linear``
    layers back (in place; returns the model). A projection whose weight a kept teacher
    module shares gets its own merged copy, so the teacher stays the original model."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no LoRA adapters")
    shared: set[int] = set()
    for _, module in converted_modules(model):
        for part in [module.teacher, *module.teacher_parts.values()]:
            if part is not None:
                shared.update(id(p) for p in part.parameters())
    for name, layer in layers:
        base = layer.get_base_layer()
        if id(base.weight) in shared:
            base.weight = nn.Parameter(base.weight.detach().clone(),
                                       requires_grad=base.weight.requires_grad)
        with torch.no_grad():
            layer.merge(adapter_names=[ADAPTER])
        _put(model, name, base)
    return model


# --------------------------------------------------------------------- objectives
def _real(inputs: Mapping[str, Any], shape: tuple[int, ...]) -> Tensor | None:
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    return mask.bool() if tuple(mask.shape) == shape else None


def _lm_loss(model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
    if "labels" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"objective='lm': {type(model).__name__} computes no loss from "
                         "labels (a model with a head: *ForCausalLM, *LMHeadModel, "
                         "*ForSequenceClassification, ...); distil it with "
                         "objective='hidden' instead")
    inputs = _model_inputs(batch, device)
    if isinstance(batch, Mapping) and "labels" in batch:
        labels = batch["labels"].to(device)
    else:
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("objective='lm' needs labels or input_ids in each batch")
        labels = ids.clone()
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(~mask.bool(), -100)
    out = model(**inputs, labels=labels)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"objective='lm': {type(model).__name__} computes no loss from "
                         "labels (a model with a head: *ForCausalLM, *LMHeadModel, "
                         "*ForSequenceClassification, ...); distil it with "
                         "objective='hidden' instead")
    return loss


def _output(model: nn.Module, inputs: Mapping[str, Any], objective: str) -> Tensor:
    if objective == "logits":
        out = model(**inputs)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise ValueError(f"objective='logits': {type(model).__name__} returns no logits; "
                             "use objective='hidden' (final hidden states)")
        return logits
    out = model(**inputs, output_hidden_states=True)
    last = getattr(out, "last_hidden_state", None)
    if last is None:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ValueError(f"objective='hidden': {type(model).__name__} returns no hidden "
                             "states")
        last = states[-1]
    return last


def distillation_loss(student: Tensor, teacher: Tensor, keep: Tensor | None,
                      objective: str) -> Tensor:
    """KL(teacher || student) of the softmax over the last axis (``"logits"``) or the mean
    squared error (``"hidden"``), averaged over the real tokens (``keep`` (B, L))."""
    if student.shape != teacher.shape:
        raise ValueError(f"the student's outputs {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)} differ in shape")
    s, t = student.float(), teacher.float()
    if objective == "logits":
        per = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                       reduction="none").sum(-1)
    else:
        per = (s - t).pow(2).mean(-1)
    if keep is None:
        return per.mean()
    return per[keep].mean() if bool(keep.any()) else per.sum() * 0


# ------------------------------------------------------------------------ the API
def finetune(model: nn.Module, data: Iterable[Batch], *,
             objective: Literal["lm", "logits", "hidden"] | str = "logits",
             teacher: nn.Module | None = None, lora: int | None = None,
             lora_alpha: float | None = None, steps: int = 100, lr: float = 1e-4,
             checkpoint: str | Path | None = None, every: int = 50, resume: bool = True,
             progress: bool = True, seed: int = 0) -> FinetuneLog:
    """Fine-tune ``model`` (a converted transformers model) in place; returns the per-step
    losses.

    ``objective``: "lm" (the model's loss on the batch's labels, or next-token prediction),
    "logits" (KL to the teacher's output distribution) or "hidden" (MSE to the teacher's
    final hidden states). ``teacher``: the module to distil from (called with the same
    inputs, in eval mode, without gradient); None uses the converted model's own kept
    teacher attention (the original model), which needs ``lora`` (full fine-tuning would
    move the weights that teacher shares). ``lora``: the LoRA rank (adapters on the
    pretrained q, k, v, o of each converted layer, ``lora_alpha`` default 2 x rank, no
    dropout; the new attention parameters train in full, the rest is frozen); None trains
    every parameter that requires a gradient. AdamW (``lr``, no weight decay). The model
    runs in the mode it is in; ``seed`` seeds dropout and the adapters' initialisation (the
    caller's random state is restored after).

    ``checkpoint``, ``every``, ``resume``: as :func:`attention_transfer` (the trained
    parameters, optimizer, step, random state and data position, written atomically; a
    resumed run ends where an uninterrupted one does). Data: token id tensors or mappings of
    model inputs, read pass after pass.
    """
    _check_training_arguments(steps, lr, every)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int) or lora < 1):
        raise ValueError(f"lora must be a rank >= 1 or None, got {lora!r}")
    if objective == "lm" and teacher is not None:
        raise ValueError("objective='lm' trains on the data's labels; teacher= is for the "
                         "distillation objectives 'logits' and 'hidden'")
    own_teacher = objective != "lm" and teacher is None
    if own_teacher:
        found = converted_modules(model)
        if not found:
            raise ValueError(f"{type(model).__name__} has no converted attention: pass "
                             "teacher= to distil from")
        if lora is None:
            raise ValueError("distilling from the converted model's own teacher modules "
                             "needs lora=RANK: they share the pretrained weights (and the "
                             "rest of the model), which full fine-tuning would change; or "
                             "pass teacher= (e.g. a copy of the model before convert)")
        if any(m.teacher is None for _, m in found):
            raise ValueError("the teacher modules were not kept (convert(..., "
                             "keep_teacher=True)); pass teacher=")
    device = _device(model)
    log = FinetuneLog(objective=objective, lora=lora)
    config = {"objective": objective, "lr": float(lr), "lora": lora, "seed": int(seed),
              "teacher": "own" if own_teacher else ("given" if teacher is not None else None)}
    path = None if checkpoint is None else Path(checkpoint)
    start = time.perf_counter()
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    with _rng_context(device), _modes_kept(model), _teacher_eval(teacher):
        torch.manual_seed(seed)
        if lora is not None:
            new = _new_parameters(model) if converted_modules(model) else {}
            _add_lora(model, lora, lora_alpha)
            train = {**lora_parameters(model), **new}
        else:
            train = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not train:
            raise ValueError("nothing to train: no parameter requires a gradient")
        try:
            chosen = {id(p) for p in train.values()}
            for p in model.parameters():
                p.requires_grad_(id(p) in chosen)
            log.trainable = sum(p.numel() for p in train.values())
            optimizer = torch.optim.AdamW(list(train.values()), lr=lr, weight_decay=0.0)
            cursor = _Cursor(data)
            step = 0
            if path is not None and resume and path.exists():
                payload = _resume(path, CHECKPOINT_FORMAT, config, train, optimizer, cursor,
                                  device, steps)
                step = log.resumed_from = int(payload["step"])
                log.losses = list(payload["log"]["losses"])
            with _bar(progress, steps, step, f"fine-tuning ({objective})") as advance:
                while step < steps:
                    batch = cursor.next()
                    if batch is _END:
                        warnings.warn(f"the data ended after {step} of {steps} steps",
                                      stacklevel=2)
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss = _step_loss(model, teacher, batch, objective, device)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    log.losses.append(float(loss.detach()))
                    advance(f"loss {log.losses[-1]:.4g}")
                    if path is not None and (step % every == 0 or step == steps):
                        _checkpoint(path, CHECKPOINT_FORMAT, config, step, train, optimizer,
                                    cursor, device, log.losses)
            optimizer.zero_grad(set_to_none=True)
        finally:
            for p, flag in flags.values():
                p.requires_grad_(flag)
    log.steps = step
    log.seconds = time.perf_counter() - start
    return log


@contextlib.contextmanager
def _teacher_eval(teacher: nn.Module | None) -> Iterator[None]:
    if teacher is None:
        yield
        return
    with _modes_kept(teacher):
        teacher.eval()
        yield


def _step_loss(model: nn.Module, teacher: nn.Module | None, batch: Batch, objective: str,
               device: torch.device) -> Tensor:
    if objective == "lm":
        return _lm_loss(model, batch, device)
    inputs = _model_inputs(batch, device)
    with torch.no_grad():
        if teacher is None:
            with teacher_mode(model), _modes_kept(model):
                model.eval()
                target = _output(model, inputs, objective)
        else:
            target = _output(teacher, inputs, objective)
    out = _output(model, inputs, objective)
    return distillation_loss(out, target, _real(inputs, tuple(out.shape[:2])),
                             objective)
