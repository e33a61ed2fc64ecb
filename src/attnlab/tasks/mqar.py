"""Multi-query associative recall (Zoology: "Zoology: Measuring and Improving Recall in
Efficient Language Models")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.tasks.base import check_positive, register_task
from attnlab.tasks.tokens import IGNORE, TokenTask, distinct_tokens

FILLER = 0  # the token between queries; keys are drawn from [1, vocab / 2), so never 0


@register_task
@dataclass
class MQAR(TokenTask):
    """k_1 v_1 ... k_n v_n, then each key again (at power-law distributed slots) followed by
    its value; the model must predict the value at every queried key.

    Keys come from [1, vocab/2), values from [vocab/2, vocab), the filler token 0 fills the
    rest. Query slots j = 0, 1, ... after the kv block are chosen without replacement with
    probability proportional to (j + 1)^(power - 1), so most queries come soon after the
    pairs and a few far away. Training mixes ``train_kv`` pair counts (one per batch); the
    slices are the accuracy per number of pairs in ``eval_kv``.
    """

    vocab: int = 64
    seq_len: int = 64
    train_kv: tuple[int, ...] = (4, 8, 16)
    eval_kv: tuple[int, ...] = (4, 8, 16)
    power: float = 0.1

    name: ClassVar[str] = "mqar"
    slice_axis: ClassVar[str] = "kv pairs"
    description: ClassVar[str] = "multi-query associative recall: accuracy per number of pairs"
    # measured in docs/results/recipe.md: softmax reaches >= 0.99 at 4/8/16 pairs (~70 s)
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 1200, "batch_size": 64, "lr": 1e-3}

    def __post_init__(self) -> None:
        self.train_kv, self.eval_kv = tuple(self.train_kv), tuple(self.eval_kv)
        check_positive("mqar", power=self.power)
        for n in {*self.train_kv, *self.eval_kv}:
            if n < 1 or 4 * n > self.seq_len or n >= self.vocab // 2:
                raise ValueError(f"mqar: {n} kv pairs need 1 <= n, 4 n <= seq_len="
                                 f"{self.seq_len} and n < vocab / 2 = {self.vocab // 2}")

    def vocab_size(self) -> int:
        return self.vocab

    def max_length(self) -> int:
        return self.seq_len

    def sample(self, batch_size: int, generator: torch.Generator,
               num_kv: int | None = None) -> tuple[Tensor, Tensor]:
        if num_kv is None:
            pick = torch.randint(len(self.train_kv), (), generator=generator)
            num_kv = self.train_kv[int(pick)]
        n, half = num_kv, self.vocab // 2
        keys = distinct_tokens(batch_size, n, 1, half, generator)
        values = torch.randint(half, self.vocab, (batch_size, n), generator=generator)
        tokens = torch.full((batch_size, self.seq_len), FILLER, dtype=torch.long)
        tokens[:, 0:2 * n:2] = keys
        tokens[:, 1:2 * n:2] = values
        slots = (self.seq_len - 2 * n) // 2
        weights = (torch.arange(slots, dtype=torch.float) + 1) ** (self.power - 1)
        chosen = torch.multinomial(weights.expand(batch_size, slots), n, replacement=False,
                                   generator=generator)
        position = 2 * n + 2 * chosen  # each slot: the key, then its value
        tokens.scatter_(1, position, keys)
        tokens.scatter_(1, position + 1, values)
        targets = torch.full_like(tokens, IGNORE)
        targets.scatter_(1, position, values)  # at the queried key, predict its value
        return tokens, targets

    def attention_targets(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(targets (B, L, L) bool, queries (B, L) bool): at each queried key (a position
        with a target), the key to attend to is the value after that key's first occurrence
        (the induction target that answers the query)."""
        tokens, labels = batch[0], batch[1]
        queries = labels != IGNORE
        length = tokens.shape[1]
        same = tokens[:, :, None] == tokens[:, None, :]  # (B, Lq, Lk)
        earlier = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril(-1)
        first = (same & earlier).float().argmax(-1)  # first earlier occurrence of the key
        targets = torch.zeros_like(same)
        rows = queries.nonzero(as_tuple=True)
        targets[rows[0], rows[1], first[rows] + 1] = True
        return targets, queries

    def slices(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(n), {"num_kv": n}) for n in self.eval_kv]
