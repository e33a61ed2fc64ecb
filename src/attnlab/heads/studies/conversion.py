"""Evaluation of converted models against their softmax teacher, and the conversion study.

A converted model keeps its teacher's pretrained q, k, v, o (and everything else) and runs
another mechanism; how much of the teacher it keeps is measured here:

- MiniLM (bidirectional, ``attnlab.integrations.hf.load_minilm``): the cosine of each held-out
  sentence's embedding to the teacher's, and nearest-neighbour agreement (the share of
  sentences whose nearest other sentence is the same under both models);
- a causal teacher (an arena ``TransformerLM`` trained with softmax on ``char_lm``):
  perplexity on the held-out test windows, of the teacher, of the converted model (as
  converted and after attention transfer, ``lm_as_converted``), and of the same mechanism
  trained from scratch through the arena for the same number of steps.

``convert_lm`` moves a ``TransformerLM`` onto another mechanism (``convert`` maps Hugging
Face models only): the same model built with the new mechanism, every tensor the two share
loaded from the teacher, the mechanism's new parameters from its own initialisation.
Held-out sentences come from the test part of the ``char_lm`` corpus (CPython's standard
library sources: bundled and offline); distillation data from its training part.

``conversion_study`` runs the reproduction of docs/results/conversion.md: each contestant
(``CONTESTANTS``) on each seed, with paired 95% intervals over seeds against Hedgehog, in the
arena's style. Attention transfer, when asked for, is ``attnlab.integrations.distill``'s
(never written here).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference

__all__ = ["CONTESTANTS", "Contestant", "LMTeacher", "contestant", "convert_lm",
           "conversion_study", "distill_available", "embedding_agreement", "held_out_sentences",
           "lm_as_converted", "lm_distill_batches", "nearest_neighbours", "perplexity",
           "sentence_pool", "train_lm", "lm_windows"]

Tick = Callable[[], None] | None
SIGMOID_N = "n"  # placeholder in a contestant's kwargs: the sequence length (b = -ln n)


@dataclass(frozen=True)
class Contestant:
    """A conversion target: a registered mechanism and its constructor arguments."""

    label: str
    mechanism: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    what: str = ""


CONTESTANTS: dict[str, Contestant] = {c.label: c for c in (
    Contestant("softmax", "softmax", {}, "the teacher's own mechanism (control: must equal "
               "the teacher)"),
    Contestant("hedgehog", "hedgehog", {}, "Hedgehog: learnable exp feature map, identity "
               "initialised"),
    Contestant("elu+1", "linear", {}, "linear attention with elu(x) + 1 features"),
    Contestant("identity", "linear", {"feature_map": "identity", "variant": "dsf"},
               "linear attention with the identity map (first-order Taylor of exp; DSF "
               "normaliser, new)"),
    Contestant("sigmoid", "sigmoid", {"max_len": SIGMOID_N}, "sigmoid attention, b = -ln n"),
    Contestant("gated", "gated", {}, "softmax with an elementwise sigmoid output gate (new)"),
    Contestant("lssa", "softplus", {"reweight_p": 0}, "length-scaled softplus attention "
               "(LSSA, no re-weighting)"),
    Contestant("neighborhood", "neighborhood", {}, "neighbourhood attention, 7 keys"),
)}


def contestant(name: str, kwargs: Mapping[str, Any] | None = None) -> Contestant:
    """A contestant by its label (``CONTESTANTS``) or a registered mechanism's name, with
    ``kwargs`` added to its arguments; ValueError naming both lists otherwise."""
    import attnlab.mechanisms  # noqa: F401  (registers the built-in mechanisms)
    from attnlab.core.registry import available

    if name in CONTESTANTS:
        base = CONTESTANTS[name]
        return Contestant(base.label, base.mechanism, {**base.kwargs, **(kwargs or {})},
                          base.what)
    if name in available():
        return Contestant(name, name, dict(kwargs or {}), name)
    raise ValueError(f"unknown mechanism {name!r}: a contestant "
                     f"({', '.join(CONTESTANTS)}) or a registered mechanism "
                     f"({', '.join(available())})")


def _resolved(kwargs: Mapping[str, Any], n: int | None) -> dict[str, Any]:
    """``kwargs`` with the sigmoid placeholder replaced by ``n`` (None: each call's keys)."""
    return {k: (n if v == SIGMOID_N else v) for k, v in kwargs.items()}


# --------------------------------------------------------------------------- metrics
def nearest_neighbours(embeddings: Tensor) -> Tensor:
    """For each row of (N, d) embeddings, the index of its most cosine-similar other row
    (N >= 2; ties go to the lower index)."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"nearest neighbours need (N >= 2, d) embeddings, got "
                         f"{tuple(embeddings.shape)}")
    unit = F.normalize(embeddings.double(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


def embedding_agreement(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """How close a student's sentence embeddings are to the teacher's, row by row:
    ``cosine`` (the mean cosine of each sentence's two embeddings; 1 for identical ones) and
    ``nn_agreement`` (the share of sentences whose nearest other sentence is the same under
    both; 1 for identical embeddings)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher embeddings must both be (N, d) of one shape, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    cos = F.cosine_similarity(student.double(), teacher.double(), dim=-1)
    agree = nearest_neighbours(student) == nearest_neighbours(teacher)
    return {"cosine": float(cos.mean()), "nn_agreement": float(agree.double().mean())}


@torch.no_grad()
def perplexity(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 64
               ) -> float:
    """exp(mean next-token cross-entropy) of ``model`` (tokens -> logits) over every
    position of ``inputs`` (N, L) with ``targets`` (N, L); the model runs in eval mode (its
    mode is restored)."""
    if inputs.shape != targets.shape or inputs.dim() != 2 or inputs.numel() == 0:
        raise ValueError(f"inputs and targets must be one non-empty (N, L) shape, got "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for x, t in zip(inputs.split(batch_size), targets.split(batch_size), strict=True):
            logits = model(x.to(device)).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), t.to(device).flatten(),
                                           reduction="sum"))
            count += t.numel()
    finally:
        model.train(was)
    return math.exp(total / count)


# ---------------------------------------------------------------------- held-out text
_WORD = re.compile(r"[A-Za-z]+")


def _prose(line: str) -> str:
    """A corpus line without comment marks, docstring quotes and surrounding space."""
    return line.strip().lstrip("#").strip().strip('"').strip("'").strip()


def _is_prose(text: str, min_words: int) -> bool:
    other = sum(not (c.isalpha() or c == " ") for c in text)
    return len(_WORD.findall(text)) >= min_words and other <= len(text) / 5


@lru_cache(maxsize=4)
def sentence_pool(split: str = "test", min_words: int = 6, max_chars: int = 200
                  ) -> tuple[str, ...]:
    """English sentences of the ``char_lm`` corpus's ``split`` (docstrings and comments of
    CPython's standard library; bundled, offline): consecutive prose lines (comment marks and
    quotes stripped) joined into paragraphs, cut at sentence ends; a sentence is kept when it
    has ``min_words`` words of letters, at most a fifth of its characters outside letters
    and spaces, 20 to ``max_chars`` characters and starts with a capital letter; distinct,
    in corpus order."""
    from attnlab.tasks.char_lm import ALPHABET, split_corpus

    codes = torch.tensor([ord(c) for c in ALPHABET] + [ord("?")] * 2, dtype=torch.uint8)
    text = bytes(codes[split_corpus(split)].numpy().tobytes()).decode("ascii")
    paragraphs: list[list[str]] = [[]]
    for raw in text.splitlines():
        line = _prose(raw)
        if line and _is_prose(line, 3):
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    seen: dict[str, None] = {}
    for lines in paragraphs:
        for piece in re.split(r"(?<=[.!?])\s+", " ".join(lines)):
            piece = piece.strip()
            if 20 <= len(piece) <= max_chars and piece[0].isupper() and \
                    piece[-1] in ".!?" and _is_prose(piece, min_words):
                seen.setdefault(piece, None)
    return tuple(seen)


def held_out_sentences(count: int, seed: int, split: str = "test") -> list[str]:
    """``count`` distinct sentences of ``sentence_pool(split)`` drawn without replacement
    with ``seed`` (different seeds, different draws)."""
    pool = sentence_pool(split)
    if not 2 <= count <= len(pool):
        raise ValueError(f"count must be in [2, {len(pool)}] (the {split} sentences), got "
                         f"{count}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return [pool[int(i)] for i in order[:count]]


def lm_windows(length: int, count: int, split: str = "test") -> tuple[Tensor, Tensor]:
    """(inputs, targets) of ``count`` fixed ``length``-character windows of the ``char_lm``
    corpus's ``split`` (evenly spread; the same for every model)."""
    from attnlab.tasks.char_lm import fixed_windows, split_corpus

    chunk = fixed_windows(split_corpus(split), count, length)
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------- causal LM conversion
@dataclass
class LMTeacher:
    """A ``TransformerLM`` teacher and how to rebuild it: the ``char_lm`` task parameters and
    the model arguments (``task.build_model(mechanism, kwargs, **model)``)."""

    model: nn.Module
    task_params: dict[str, Any]
    model_args: dict[str, Any]
    steps: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)


def convert_lm(teacher: LMTeacher, mechanism: str, kwargs: Mapping[str, Any] | None = None,
               seed: int = 0) -> nn.Module:
    """The teacher's ``TransformerLM`` rebuilt with ``mechanism`` (arguments ``kwargs``):
    every tensor of the teacher's state dict goes into the same place (q, k, v, o,
    embeddings, norms, MLPs, head); the mechanism's new parameters keep the initialisation of
    its constructor under ``torch.manual_seed(seed)``. ValueError when the mechanism cannot
    hold the teacher's tensors (a name the new model lacks, or another shape)."""
    from attnlab.tasks import make_task

    task: Any = make_task("char_lm", **teacher.task_params)
    torch.manual_seed(seed)
    try:
        student = task.build_model(mechanism, dict(kwargs or {}), **teacher.model_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"TransformerLM -> {mechanism}: {err}") from None
    state = teacher.model.state_dict()
    own = student.state_dict()
    lost = [k for k in state if k not in own]
    shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if lost or shape:
        raise ValueError(f"TransformerLM -> {mechanism}: cannot hold the softmax teacher's "
                         f"tensors: {', '.join(lost + shape)[:300]} "
                         f"({'missing' if lost else 'other shape'} in the new model)")
    student.load_state_dict(state, strict=False)
    return student.to(next(teacher.model.parameters()).device).eval()


def _spec(mechanism: str, kwargs: dict[str, Any], seed: int, steps: int,
          task_params: dict[str, Any], model_args: dict[str, Any], device: str,
          sweep: str) -> Any:
    from attnlab.arena.config import RunSpec

    train = {"steps": steps, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.01,
             "warmup": 0.05, "curve_points": 10, "val_points": 0, "device": device,
             "threads": torch.get_num_threads()}
    return RunSpec(sweep=sweep, task="char_lm", task_params=task_params, label=mechanism,
                   mechanism=mechanism, kwargs=kwargs, model=model_args, train=train,
                   seed=seed)


def train_lm(mechanism: str, kwargs: dict[str, Any], seed: int, steps: int,
             task_params: dict[str, Any], model_args: dict[str, Any],
             device: str = "cpu") -> LMTeacher:
    """A ``char_lm`` ``TransformerLM`` of ``mechanism`` trained by the arena's trainer
    (``train_run``: AdamW, warm-up and cosine decay, lr 3e-3, batch 32) for ``steps`` steps
    with ``seed``; RuntimeError with the run's error if it failed."""
    from safetensors.torch import load as load_bytes

    from attnlab.arena.trainer import train_run
    from attnlab.tasks import make_task

    spec = _spec(mechanism, kwargs, seed, steps, task_params, model_args, device,
                 "conversion")
    result = train_run(spec)
    if result["status"] != "done":
        raise RuntimeError(f"training {mechanism} (seed {seed}) failed: {result['error']}")
    task: Any = make_task("char_lm", **task_params)
    model = task.build_model(mechanism, kwargs, **model_args)
    model.load_state_dict(load_bytes(result["model"]), strict=True)
    return LMTeacher(model.to(device).eval(), dict(task_params), dict(model_args), steps,
                     seed, dict(result["metrics"]))


# ------------------------------------------------------------------------ distillation
def distill_available() -> bool:
    """Whether ``attnlab.integrations.distill`` (attention transfer) is installed."""
    try:
        import attnlab.integrations.distill  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def lm_as_converted(student: nn.Module, teacher: LMTeacher) -> Iterator[nn.Module]:
    """``student`` (from ``convert_lm``) with the attention of every block wrapped, for the
    block, in ``attnlab.integrations.convert.ConvertedAttention``: its teacher is the
    softmax attention of the same block of ``teacher.model`` (kept as is, not copied), its
    pretrained parameters those whose names the teacher's state dict holds (q, k, v, o), the
    rest the mechanism's new ones. Attention transfer
    (``attnlab.integrations.distill.attention_transfer``) then trains the new parameters
    with teacher forcing, as for a Hugging Face conversion. The blocks get their own
    attention modules back on exit (also after an error)."""
    from attnlab.integrations.convert import ConvertedAttention
    from attnlab.mechanisms.base import Attention

    state = teacher.model.state_dict()
    wrapped: list[tuple[nn.Module, str, Attention]] = []
    paths = [path for path, m in student.named_modules()
             if isinstance(m, Attention) and path.endswith(".attn")]
    if not paths:
        raise ValueError(f"{type(student).__name__} has no attnlab attention modules to wrap")
    try:
        for index, path in enumerate(paths):
            attn = student.get_submodule(path)
            assert isinstance(attn, Attention)
            try:
                original = teacher.model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"the teacher has no {path} for the student's") from None
            parent_path, _, name = path.rpartition(".")
            parent = student.get_submodule(parent_path)
            pretrained = tuple(n for n, _ in attn.named_parameters() if f"{path}.{n}" in state)
            setattr(parent, name, ConvertedAttention(
                attn, architecture="attnlab TransformerLM", layer_idx=index, window=None,
                pretrained=pretrained, teacher=original))
            wrapped.append((parent, name, attn))
        yield student
    finally:
        for parent, name, attn in wrapped:
            setattr(parent, name, attn)


def lm_distill_batches(length: int, steps: int, seed: int, batch_size: int = 32
                       ) -> list[Tensor]:
    """``steps`` batches of ``batch_size`` token windows (``length`` tokens) of the
    ``char_lm`` corpus's training part for attention transfer: ``steps * batch_size`` evenly
    spread windows in an order drawn with ``1000 + seed`` (as the MiniLM arm's sentences)."""
    inputs, _ = lm_windows(length, max(1, steps) * batch_size, split="train")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(1000 + seed))
    return list(inputs[order].split(batch_size))


def distill(model: nn.Module, data: Sequence[Any], loss: str, steps: int, lr: float,
            seed: int, device: str | None = None) -> Any:
    """Attention transfer of a converted model's new parameters towards its teacher with
    ``attnlab.integrations.distill.attention_transfer`` (ImportError when it is absent);
    returns its ``TransferLog``. A Hugging Face model from ``convert``, or a
    ``TransformerLM`` from ``convert_lm`` inside ``lm_as_converted``."""
    try:
        from attnlab.integrations.distill import attention_transfer
    except ImportError:
        raise ImportError("attention transfer needs attnlab.integrations.distill, which this "
                          "attnlab does not have") from None
    del device  # the data are on the model's device already
    return attention_transfer(model, data, loss=loss, steps=steps, lr=lr, progress=False,
                              seed=seed)


def minilm_batches(tokenizer: Any, sentences: Sequence[str], batch_size: int,
                   device: str) -> list[dict[str, Tensor]]:
    """Tokenised batches (``input_ids``, ``attention_mask``, ...) of ``sentences``."""
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True,
                          truncation=True, max_length=128, return_tensors="pt")
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


# ------------------------------------------------------------------------- the study
def _minilm_arm(names: Sequence[str], seeds: Sequence[int], sentences: int,
                distill_loss: str | None, steps: int, lr: float, device: str,
                tick: Tick) -> dict[str, dict[int, dict[str, float]]]:
    from attnlab.integrations.convert import convert, new_parameters
    from attnlab.integrations.hf import load_minilm, sentence_embeddings

    out: dict[str, dict[int, dict[str, float]]] = {n: {} for n in names}
    teacher, tokenizer = load_minilm()
    teacher = teacher.to(device)
    train_pool = sentence_pool("train")
    for seed in seeds:
        held = held_out_sentences(sentences, seed)
        reference = sentence_embeddings(teacher, tokenizer, held)
        for name in names:
            c = contestant(name)
            student, _ = load_minilm()
            torch.manual_seed(seed)
            # sigmoid: n = the keys of each call (max_len=None, bidirectional)
            convert(student, c.mechanism, **_resolved(c.kwargs, None))
            student = student.to(device)
            row: dict[str, float] = {"new_parameters": float(sum(
                p.numel() for p in new_parameters(student).values()))}
            if distill_loss and steps and row["new_parameters"]:
                order = torch.randperm(len(train_pool),
                                       generator=torch.Generator().manual_seed(1000 + seed))
                data = minilm_batches(tokenizer, [train_pool[int(i)] for i in order[:16 * 32]],
                                      16, device)
                log = distill(student, data, distill_loss, steps, lr, seed)
                row.update(transfer_first=log.mean(0), transfer_last=log.mean(-1),
                           untrained=float(len(log.untrained)))
            student.eval()
            row.update(embedding_agreement(sentence_embeddings(student, tokenizer, held),
                                           reference))
            out[name][seed] = row
            if tick:
                tick()
    return out


def _lm_arm(names: Sequence[str], seeds: Sequence[int], teacher_steps: int, steps: int,
            windows: int, device: str,
            task_params: dict[str, Any], model_args: dict[str, Any], tick: Tick,
            distill_loss: str | None = None, lr: float = 1e-2
            ) -> tuple[dict[str, dict[int, dict[str, float]]], dict[int, float],
                       dict[str, str]]:
    """Per contestant and seed: perplexity as converted, after attention transfer
    (``distill_loss``, ``steps`` steps, ``lr``; equal to the converted one for a mechanism
    with no new parameters or without distillation) and from scratch; the teachers'
    perplexities; the loss each distilled contestant got (auto resolved)."""
    inputs, targets = lm_windows(task_params["length"], windows)
    losses: dict[str, str] = {}
    out: dict[str, dict[int, dict[str, float]]] = {n: {} for n in names}
    teachers: dict[int, float] = {}
    for seed in seeds:
        teacher = train_lm("softmax", {}, seed, teacher_steps, task_params, model_args, device)
        teachers[seed] = perplexity(teacher.model, inputs, targets)
        for name in names:
            c = contestant(name)
            kwargs = _resolved(c.kwargs, task_params["length"])
            student = convert_lm(teacher, c.mechanism, kwargs, seed)
            new = sum(v.numel() for k, v in student.state_dict().items()
                      if k not in teacher.model.state_dict())
            row = {"converted": perplexity(student, inputs, targets),
                   "new_parameters": float(new)}
            row["distilled"] = row["converted"]
            if distill_loss and steps and new:
                data = lm_distill_batches(task_params["length"], steps, seed)
                data = [d.to(device) for d in data]
                with lm_as_converted(student, teacher) as wrapped:
                    log = distill(wrapped, data, distill_loss, steps, lr, seed)
                row.update(transfer_first=log.mean(0), transfer_last=log.mean(-1),
                           untrained=float(len(log.untrained)),
                           distilled=perplexity(student, inputs, targets))
                losses[name] = log.loss
            scratch = train_lm(c.mechanism, kwargs, seed, steps, task_params, model_args,
                               device) if steps else None
            row["scratch"] = math.nan if scratch is None else \
                perplexity(scratch.model, inputs, targets)
            out[name][seed] = row
            if tick:
                tick()
    return out, teachers, losses


def _by_seed(runs: dict[int, dict[str, float]], key: str) -> dict[int, float]:
    return {s: r[key] for s, r in runs.items()}


def conversion_study(names: Sequence[str], seeds: Sequence[int], *, sentences: int = 256,
                     teacher_steps: int = 400, steps: int = 100, windows: int = 256,
                     distill_loss: str | None = "hedgehog", lr: float = 1e-2,
                     device: str = "cpu", parts: Sequence[str] = ("minilm", "lm"),
                     task_params: dict[str, Any] | None = None,
                     model_args: dict[str, Any] | None = None, tick: Tick = None
                     ) -> tuple[dict[str, Any], list, dict[str, bytes]]:
    """The conversion reproduction: every contestant of ``names`` on every seed, MiniLM
    (cosine, NN agreement on ``sentences`` held-out sentences) and the causal char-LM
    (perplexity on ``windows`` held-out windows: the teacher trained ``teacher_steps`` steps,
    the converted model, the mechanism from scratch for ``steps`` steps). ``distill_loss``
    (None: none) and ``steps``: the attention transfer of the converted models (only when
    ``attnlab.integrations.distill`` exists). Returns (numbers, sections, images) for
    ``write_document``."""
    if len(seeds) < 1 or not names:
        raise ValueError("need at least one seed and one contestant")
    for name in names:
        contestant(name)
    unknown = set(parts) - {"minilm", "lm"}
    if unknown:
        raise ValueError(f"parts are 'minilm' and 'lm', got {sorted(unknown)}")
    if distill_loss is not None and not distill_available():
        distill_loss = None
    task_params = {"length": 128, "eval_windows": 256, **(task_params or {})}
    model_args = {"dim": 96, "depth": 2, "heads": 4, **(model_args or {})}
    numbers: dict[str, Any] = {"contestants": {n: vars(contestant(n)) for n in names},
                               "seeds": list(seeds), "distill": distill_loss,
                               "steps": steps}
    sections: list = []
    reference = "hedgehog" if "hedgehog" in names else names[0]
    if "minilm" in parts:
        mini = _minilm_arm(names, seeds, sentences, distill_loss, steps, lr, device, tick)
        numbers["minilm"] = mini
        header = ["contestant", "new parameters", "transfer loss first -> last",
                  "cosine to teacher", "NN agreement", f"cosine - {reference}",
                  f"NN agreement - {reference}"]
        rows = []
        for name in names:
            runs = mini[name]
            cells = [fmt(*mean_ci([r[m] for r in runs.values()]), 4)
                     for m in ("cosine", "nn_agreement")]
            diffs = [fmt_paired(paired_difference(_by_seed(runs, m),
                                                  _by_seed(mini[reference], m)))
                     if name != reference else "(reference)"
                     for m in ("cosine", "nn_agreement")]
            first = [r["transfer_first"] for r in runs.values() if "transfer_first" in r]
            last = [r["transfer_last"] for r in runs.values() if "transfer_last" in r]
            moved = f"{fmt(*mean_ci(first), 3)} -> {fmt(*mean_ci(last), 3)}" if first else \
                "not trained"
            rows.append([name, f"{int(next(iter(runs.values()))['new_parameters']):,}", moved,
                         *cells, *diffs])
        sections.append((f"MiniLM (all-MiniLM-L6-v2): agreement with the teacher on "
                         f"{sentences} held-out sentences per seed (mean ± 95% CI over "
                         f"{len(seeds)} seeds; differences paired by seed [95% CI])",
                         [("table", (header, rows))]))
    if "lm" in parts:
        lm, teachers, lm_losses = _lm_arm(names, seeds, teacher_steps, steps, windows,
                                          device, task_params, model_args, tick,
                                          distill_loss, lr)
        numbers["lm"] = {"runs": lm, "teacher": teachers, "losses": lm_losses}
        header = ["contestant", "new parameters", "transfer loss first -> last",
                  "converted ppl", "distilled ppl", f"scratch ppl ({steps} steps)",
                  "distilled - teacher", "distilled - scratch", f"distilled - {reference}"]
        rows = [["teacher (softmax)", "", "", fmt(*mean_ci(list(teachers.values())), 4),
                 "", "", "", "", ""]]
        for name in names:
            runs = lm[name]
            dist = _by_seed(runs, "distilled")
            first = [r["transfer_first"] for r in runs.values() if "transfer_first" in r]
            last = [r["transfer_last"] for r in runs.values() if "transfer_last" in r]
            moved = (f"{lm_losses.get(name, '')}: {fmt(*mean_ci(first), 3)} -> "
                     f"{fmt(*mean_ci(last), 3)}") if first else "not trained"
            rows.append([
                name, f"{int(next(iter(runs.values()))['new_parameters']):,}", moved,
                fmt(*mean_ci([r["converted"] for r in runs.values()]), 4),
                fmt(*mean_ci(list(dist.values())), 4),
                fmt(*mean_ci([r["scratch"] for r in runs.values()]), 4),
                fmt_paired(paired_difference(dist, teachers)),
                fmt_paired(paired_difference(dist, _by_seed(runs, "scratch"))),
                fmt_paired(paired_difference(dist, _by_seed(lm[reference], "distilled")))
                if name != reference else "(reference)"])
        sections.append((f"Causal char-LM teacher (softmax TransformerLM, {teacher_steps} "
                         f"steps): perplexity on {windows} held-out windows, as converted, "
                         f"after attention transfer ({distill_loss or 'none'}, {steps} steps; "
                         "= converted where nothing is trained) and from scratch (mean ± 95% "
                         f"CI over {len(seeds)} seeds; differences paired by seed [95% CI])",
                         [("table", (header, rows))]))
    return numbers, sections, {}
