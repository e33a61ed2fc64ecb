"""A family of in-context tasks: fixed symbol maps, the one to apply shown by examples.

The setting of "Soft Injection of Task Embeddings Outperforms Prompt-Based In-Context
Learning" at toy scale: a prompt's demonstrations say which task it is, and a task
embedding should be able to stand in for them (``attnlab.heads.injection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.tasks.base import check_positive, register_task
from attnlab.tasks.tokens import IGNORE, TokenTask, distinct_tokens


@lru_cache(maxsize=8)
def map_table(maps: int, symbols: int, seed: int) -> Tensor:
    """(maps, symbols): row t is map t, f_t(x) = table[t, x], drawn uniformly from
    [0, symbols) with ``seed`` (random functions, not permutations)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, symbols, (maps, symbols), generator=generator)


@register_task
@dataclass
class InContextMaps(TokenTask):
    """BOS x_1 y_1 x_2 y_2 ... with y_i = f_t(x_i) for one map t of a fixed family, drawn
    per sequence; predict each y_i at x_i.

    ``maps`` maps from ``symbols`` inputs to ``symbols`` outputs are drawn once from
    ``map_seed``. Inputs are tokens [0, symbols), outputs [symbols, 2 symbols), BOS is
    2 symbols; the inputs of a sequence are distinct, so an answer is never a copy of an
    earlier one: the model must learn the maps in its weights and infer t from the pairs
    before. The answer at x_1 is zero-shot (nothing says which map), at x_{k+1} it follows
    k demonstrations. Training sequences hold ``pairs`` pairs, loss at every answer.

    Metric: test accuracy. Slices: accuracy after k demonstrations for k in ``eval_shots``,
    against the Bayes predictor (posterior over the maps given the demonstrations, uniform
    prior), on the same test prompts.
    """

    symbols: int = 16
    maps: int = 16
    pairs: int = 9
    eval_shots: tuple[int, ...] = (0, 1, 2, 4, 8)
    map_seed: int = 0

    name: ClassVar[str] = "icl_maps"
    slice_axis: ClassVar[str] = "demonstrations"
    description: ClassVar[str] = "a family of symbol maps, the one to apply shown in context"
    default_seeds: ClassVar[int] = 3
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 1500, "batch_size": 64, "lr": 1e-3}

    def __post_init__(self) -> None:
        self.eval_shots = tuple(self.eval_shots)
        check_positive("icl_maps", symbols=self.symbols - 1, maps=self.maps,
                       pairs=self.pairs)
        if self.pairs > self.symbols:
            raise ValueError(f"icl_maps: {self.pairs} pairs need as many distinct inputs; "
                             f"symbols={self.symbols}")
        for k in self.eval_shots:
            if not 0 <= k < self.pairs:
                raise ValueError(f"icl_maps: eval_shots must be in [0, pairs={self.pairs}), "
                                 f"got {k}")

    @property
    def bos(self) -> int:
        return 2 * self.symbols

    def table(self) -> Tensor:
        return map_table(self.maps, self.symbols, self.map_seed)

    def vocab_size(self) -> int:
        return 2 * self.symbols + 1

    def max_length(self) -> int:
        return 2 * self.pairs

    def prompts(self, tasks: Tensor, shots: int, generator: torch.Generator,
                queries: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(tokens (B, 2 shots + 2), answers (B,)): BOS, ``shots`` demonstrations of map
        ``tasks[b]``, then a query x whose answer f_t(x) is to come next. ``queries`` fixes
        the query inputs (B,); the demonstrations' inputs are distinct from it and each
        other."""
        b = len(tasks)
        if queries is None:
            xs = distinct_tokens(b, shots + 1, 0, self.symbols, generator)
        else:
            order = torch.rand(b, self.symbols, generator=generator)
            order[torch.arange(b), queries] = 2.0  # the query sorts last: never a demo
            xs = torch.cat([order.argsort(-1)[:, :shots], queries[:, None]], dim=1)
        ys = self.table()[tasks[:, None], xs] + self.symbols
        tokens = torch.full((b, 2 * shots + 2), self.bos, dtype=torch.long)
        tokens[:, 1::2] = xs
        tokens[:, 2::2] = ys[:, :shots]
        return tokens, ys[:, shots]

    def sample(self, batch_size: int, generator: torch.Generator,
               shots: int | None = None) -> tuple[Tensor, Tensor]:
        """Sequences of ``pairs`` pairs; targets at every answer, or only after ``shots``
        demonstrations when it is given."""
        tasks = torch.randint(0, self.maps, (batch_size,), generator=generator)
        full, last = self.prompts(tasks, self.pairs - 1, generator)
        tokens = torch.cat([full, last[:, None]], dim=1)  # BOS x1 y1 ... xP yP
        inputs, answers = tokens[:, :-1], tokens[:, 1:]
        targets = torch.full_like(inputs, IGNORE)
        answer_at = torch.arange(1, inputs.shape[1], 2)  # the x positions
        if shots is not None:
            answer_at = answer_at[shots:shots + 1]
        targets[:, answer_at] = answers[:, answer_at]
        return inputs, targets

    def slices(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(k), {"shots": k}) for k in self.eval_shots]

    def bayes(self, inputs: Tensor, position: int) -> Tensor:
        """(B, symbols): the posterior predictive of the answer at ``position`` (an x
        position) given the pairs before it, each map a priori equally likely."""
        table = self.table()
        shown = (position - 1) // 2
        consistent = torch.ones(inputs.shape[0], self.maps, dtype=torch.bool)
        for i in range(shown):
            x, y = inputs[:, 1 + 2 * i], inputs[:, 2 + 2 * i] - self.symbols
            consistent &= table[:, x].T == y[:, None]
        weights = consistent.double() / consistent.sum(-1, keepdim=True)
        outputs = table[:, inputs[:, position]].T  # (B, maps)
        return torch.zeros(inputs.shape[0], self.symbols, dtype=torch.float64).scatter_add_(
            1, outputs, weights)

    def slice_baselines(self, slice_kwargs: dict[str, Any], inputs: Tensor, targets: Tensor
                        ) -> dict[str, float]:
        """The Bayes predictor's accuracy at the slice's answer, on the same prompts."""
        position = 1 + 2 * slice_kwargs["shots"]
        truth = targets[:, position] - self.symbols
        return {"bayes": (self.bayes(inputs, position).argmax(-1) == truth).double().mean()
                .item()}
