"""Shared machinery of the next-token tasks: a TransformerLM, masked cross-entropy, accuracy."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models.transformer_lm import TransformerLM
from attnlab.tasks.base import Evaluation, Task, check_split, split_generator

IGNORE = -100  # target value of positions that carry no loss


def masked_scores(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
    """Mean cross-entropy and accuracy over the positions whose target is not IGNORE."""
    keep = targets != IGNORE
    count = int(keep.sum())
    if count == 0:
        raise ValueError("a batch has no target position")
    picked = logits[keep]
    loss = F.cross_entropy(picked.float(), targets[keep])
    acc = (picked.argmax(-1) == targets[keep]).float().mean()
    return loss, acc, count


class TokenTask(Task):
    """A next-token task: ``sample`` gives (inputs, targets) with IGNORE where no loss is.

    ``slices()`` lists (label, keyword arguments of ``sample``); an evaluation scores each
    slice on ``eval_size`` sequences of the split's fixed stream (the same for every run).
    """

    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    eval_size: ClassVar[int] = 512

    def vocab_size(self) -> int:
        raise NotImplementedError

    def max_length(self) -> int:
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator, *args: Any,
               **slice_kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def slices(self) -> list[tuple[str, dict[str, Any]]]:
        raise NotImplementedError

    def train_length(self) -> int:
        """The length of the training sequences (mechanisms that depend on it get it)."""
        return self.max_length()

    def build_model(self, mechanism: str, mechanism_kwargs: dict, **model: Any) -> nn.Module:
        model = {"max_len": self.max_length(), "train_length": self.train_length(), **model}
        return TransformerLM(self.vocab_size(), mechanism=mechanism,
                             mechanism_kwargs=mechanism_kwargs, **model)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Any:
        return self.sample(batch_size, generator)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        return masked_scores(model(inputs), targets)[0]

    def slice_baselines(self, slice_kwargs: dict[str, Any], inputs: Tensor, targets: Tensor
                        ) -> dict[str, float]:
        """Closed-form predictors' primary metric on one evaluation slice's data (name ->
        value); none by default. ``evaluate`` reports them per slice and, averaged over the
        slices, as the metric ``<name>_<metric>``."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> Evaluation:
        check_split(split)
        generator = split_generator(0, split)
        losses, accs, sizes, slices = [], [], [], {}
        baselines: dict[str, dict[str, float]] = {}
        for label, kwargs in self.slices():
            inputs, targets = self.sample(self.eval_size, generator, **kwargs)
            loss, acc, count = masked_scores(model(inputs), targets)
            losses.append(loss.item())
            accs.append(acc.item())
            sizes.append(count)
            slices[label] = acc.item() if self.metric == "accuracy" else loss.item()
            for name, value in self.slice_baselines(kwargs, inputs, targets).items():
                baselines.setdefault(name, {})[label] = value
        total = sum(sizes)
        metrics = {"accuracy": sum(a * n for a, n in zip(accs, sizes, strict=True)) / total,
                   "loss": sum(v * n for v, n in zip(losses, sizes, strict=True)) / total}
        for name, per_slice in baselines.items():
            metrics[f"{name}_{self.metric}"] = sum(per_slice.values()) / len(per_slice)
        return Evaluation(metrics, slices, baselines)


class SequenceTask(TokenTask):
    """A next-token task over whole sequences from ``sequences`` (every position has a
    target); one slice, and ``scored`` gives the per-position losses of an evaluation."""

    def sequences(self, batch_size: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        seq = self.sequences(batch_size, generator)
        return seq[:, :-1], seq[:, 1:]

    def slices(self) -> list[tuple[str, dict[str, Any]]]:
        return [("all", {})]

    def scored(self, model: nn.Module, split: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(inputs, targets, logits, per-position loss) on the fixed ``split`` stream."""
        check_split(split)
        inputs, targets = self.sample(self.eval_size, split_generator(0, split))
        logits = model(inputs).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                              reduction="none").view_as(targets)
        return inputs, targets, logits, nll


def distinct_tokens(batch_size: int, count: int, low: int, high: int,
                    generator: torch.Generator) -> Tensor:
    """(batch_size, count) tokens from [low, high), distinct within each row."""
    if count > high - low:
        raise ValueError(f"cannot draw {count} distinct tokens from [{low}, {high})")
    order = torch.rand(batch_size, high - low, generator=generator).argsort(-1)
    return order[:, :count] + low
