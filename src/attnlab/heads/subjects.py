"""What the ``attnlab heads`` commands look at: a model with its data, loss and metric.

- ``minilm_subject()``: all-MiniLM-L6-v2 (the hf extra) on standard-library docstring
  sentences. Loss: the in-batch contrastive loss it was trained with (a docstring's first
  sentence must find its second among the batch's, cosine x 20, cross-entropy). Metric: the
  mean cosine between the embeddings of held-out sentences and the unpruned model's.
- ``run_subject(store, key)``: an arena run's model on its task: loss on training batches
  of a fixed seed, metric the task's own on the validation split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Subject", "minilm_subject", "run_subject", "open_subject"]


@dataclass
class Subject:
    """``losses``: calls returning a scalar loss on one batch each (for importance);
    ``metric()``: higher is better (``metric_name`` says what it is); ``inputs``: calls that
    run one forward each, with the (B, L) key mask and special-token mask the statistics
    use (None: every token real / no special token), and ``tokens`` their token strings;
    ``positions`` (L, P): the tokens' coordinates for distances (a ViT's patch rows and
    columns; None: the token index), ``unit`` what a distance of 1 is."""

    name: str
    model: nn.Module
    losses: list[Callable[[], Tensor]]
    metric: Callable[[], float]
    metric_name: str
    inputs: list[tuple[Callable[[], Any], Tensor | None, Tensor | None]]
    tokens: list[list[list[str]]] = field(default_factory=list)
    hidden_states: Callable[[int], tuple[list[Tensor], Tensor]] | None = None
    notes: list[str] = field(default_factory=list)
    positions: Tensor | None = None
    unit: str = "tokens"


def minilm_subject(batch_size: int = 16, importance_pairs: int = 96,
                   seed: int = 0) -> Subject:
    """MiniLM on docstring sentences (``importance_pairs`` pairs for the loss, the rest
    held out for the metric)."""
    from attnlab.heads.text import docstring_pairs
    from attnlab.integrations.hf import load_minilm, mean_pooled, sentence_embeddings

    model, tokenizer = load_minilm()
    pairs = docstring_pairs(seed)
    if len(pairs) <= importance_pairs:
        raise ValueError(f"only {len(pairs)} docstring pairs on this Python; ask for fewer "
                         f"than {importance_pairs} for the loss")
    train, held = pairs[:importance_pairs], pairs[importance_pairs:]
    held_out = [s for pair in held for s in pair]

    def encode(sentences: list[str]) -> dict[str, Tensor]:
        return tokenizer(sentences, padding=True, truncation=True, max_length=128,
                         return_tensors="pt")

    def embed(batch: dict[str, Tensor]) -> Tensor:
        return mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])

    batches = [(encode([a for a, _ in train[i:i + batch_size]]),
                encode([b for _, b in train[i:i + batch_size]]))
               for i in range(0, len(train), batch_size)]

    def contrastive(first: dict[str, Tensor], second: dict[str, Tensor]) -> Tensor:
        scores = embed(first) @ embed(second).T * 20.0
        return nn.functional.cross_entropy(scores, torch.arange(scores.shape[0]))

    with torch.no_grad():
        reference = sentence_embeddings(model, tokenizer, held_out)

    def cosine() -> float:
        with torch.no_grad():
            now = sentence_embeddings(model, tokenizer, held_out)
        return float((now * reference).sum(-1).mean())

    held_batches = [encode(held_out[i:i + batch_size])
                    for i in range(0, len(held_out), batch_size)]
    inputs: list[tuple[Callable[[], Any], Tensor | None, Tensor | None]]
    inputs = [(functools.partial(model, **b), b["attention_mask"].bool(),
               torch.isin(b["input_ids"], torch.tensor([tokenizer.sep_token_id])))
              for b in held_batches]
    tokens = [[tokenizer.convert_ids_to_tokens(row) for row in b["input_ids"].tolist()]
              for b in held_batches]

    def hidden_states(index: int) -> tuple[list[Tensor], Tensor]:
        b = held_batches[index]
        with torch.no_grad():
            out = model(**b, output_hidden_states=True)
        return list(out.hidden_states), b["attention_mask"].bool()

    return Subject(
        "all-MiniLM-L6-v2", model,
        [functools.partial(contrastive, a, b) for a, b in batches], cosine,
        "mean cosine of held-out sentence embeddings to the unpruned model's", inputs,
        tokens, hidden_states,
        [f"{len(train)} docstring pairs for the loss (in-batch contrastive, batches of "
         f"{batch_size}), {len(held_out)} held-out sentences for the metric and the "
         "attention statistics (special tokens: [SEP])"])


def run_subject(store: str | Path, key: str, batches: int = 4, batch_size: int = 32,
                seed: int = 1234) -> Subject:
    """An arena run's model on its task (``batches`` training batches drawn with ``seed``,
    not the run's own)."""
    from attnlab.heads.runs import load_run
    from attnlab.heads.spatial import grid_positions

    run = load_run(store, key)
    task, model = run.task, run.model
    generator = torch.Generator().manual_seed(seed)
    data = [task.train_batch(batch_size, generator) for _ in range(batches)]
    sign = 1.0 if task.higher_is_better else -1.0

    def metric() -> float:
        with torch.no_grad():
            return sign * float(task.evaluate(model, "val").metrics[task.metric])

    row = run.row
    grid = getattr(model, "grid", None)  # a ViT: distances between patches
    return Subject(
        f"run {row['key'][:10]} ({row['label']} seed {row['seed']}, task {row['sweep']})",
        model, [functools.partial(task.loss, model, b) for b in data], metric,
        f"{'' if sign > 0 else '-'}validation {task.metric}",
        [(functools.partial(task.loss, model, b), None, None) for b in data],
        notes=[f"{batches} training batches of {batch_size} (seed {seed}) for the loss and "
               "the attention statistics"],
        positions=None if grid is None else grid_positions(grid),
        unit="tokens" if grid is None else "patches")


def open_subject(model: str, store: str | Path) -> Subject:
    """``minilm``, a run key of ``store``, or a saved model file ``<store>/models/<key>
    .safetensors``."""
    if model == "minilm":
        return minilm_subject()
    path = Path(model)
    if path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"no saved model at {path}")
        return run_subject(path.parent.parent, path.stem)
    return run_subject(store, model)
