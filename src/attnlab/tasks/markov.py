"""In-context Markov chains: next-token prediction with a Bayes-optimal baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.tasks.base import (
    Evaluation,
    check_positive,
    register_task,
)
from attnlab.tasks.tokens import SequenceTask

BUCKETS = 4


def count_predictors(tokens: Tensor, states: int, alpha: float) -> dict[str, Tensor]:
    """Closed-form next-token distributions (B, L - 1, states) from in-context counts.

    ``bayes``: the posterior predictive of a chain whose transition rows are
    Dirichlet(alpha): p(j | i) = (c_ij + alpha) / (c_i + states alpha), counting the
    transitions seen so far (Bayes optimal for this generator). ``unigram``: the same with
    token counts, ignoring the previous token.
    """
    prev, nxt = tokens[:, :-1], tokens[:, 1:]
    b, steps = prev.shape
    pair = F.one_hot(prev * states + nxt, states * states).double()
    seen = pair.cumsum(1) - pair  # transitions strictly before each step
    rows = seen.view(b, steps, states, states)
    counts = rows.gather(2, prev[..., None, None].expand(b, steps, 1, states)).squeeze(2)
    bayes = (counts + alpha) / (counts.sum(-1, keepdim=True) + states * alpha)
    tok = F.one_hot(tokens, states).double().cumsum(1)[:, :-1]  # tokens up to the current one
    unigram = (tok + alpha) / (tok.sum(-1, keepdim=True) + states * alpha)
    return {"bayes": bayes, "unigram": unigram}


@register_task
@dataclass
class Markov(SequenceTask):
    """Each sequence follows its own Markov chain over ``states`` tokens, with transition
    rows drawn from Dirichlet(``alpha``); predict every next token.

    The chain must be inferred in context (the bigram statistics of the prefix): the
    in-context Markov chain task (ICL-MC) of Edelman, Edelman, Goel, Malach and Tsilivis,
    "The Evolution of Statistical Induction Heads: In-Context Learning Markov Chains"
    (NeurIPS 2024, arXiv 2402.11004), with its in-context unigram and bigram (here the
    Dirichlet posterior, Bayes optimal) predictors as baselines. The arena uses it for the
    catalogue's selective attention ("Selective Attention: Enhancing Transformer through
    Principled Context Control", Zhang et al., 2024; MECHANISMS.md section E); it is not the
    task of "Selective Attention Improves Transformer" (Leviathan et al., 2024), a different
    mechanism that this module used to cite. Metric: test loss (nats per token); slices: loss
    per quarter of the sequence, against the Bayes-optimal (Dirichlet posterior) and
    in-context unigram predictors on the same test sequences.
    """

    states: int = 8
    length: int = 128
    alpha: float = 0.5

    name: ClassVar[str] = "markov"
    metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    slice_axis: ClassVar[str] = "sequence quarter"
    description: ClassVar[str] = "in-context Markov chains, vs the Bayes-optimal predictor"
    eval_size: ClassVar[int] = 256
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 400, "batch_size": 32, "lr": 3e-3}

    def __post_init__(self) -> None:
        check_positive("markov", alpha=self.alpha, states=self.states - 1,
                       length=self.length - 1)

    def vocab_size(self) -> int:
        return self.states

    def max_length(self) -> int:
        return self.length

    def sequences(self, batch_size: int, generator: torch.Generator) -> Tensor:
        k = self.states
        # Dirichlet rows from normalised Gamma draws, with the generator for reproducibility
        u = torch.rand(batch_size, k, k, generator=generator).clamp_min(1e-12)
        rows = _gamma_from_uniform(u, self.alpha)
        trans = rows / rows.sum(-1, keepdim=True)
        seq = torch.empty(batch_size, self.length, dtype=torch.long)
        seq[:, 0] = torch.randint(0, k, (batch_size,), generator=generator)
        draws = torch.rand(batch_size, self.length, generator=generator)
        cdf = trans.cumsum(-1)
        for t in range(1, self.length):
            row = cdf[torch.arange(batch_size), seq[:, t - 1]]
            seq[:, t] = (draws[:, t, None] > row).sum(-1).clamp_max(k - 1)
        return seq

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> Evaluation:
        inputs, targets, logits, nll = self.scored(model, split)
        seq = torch.cat([inputs, targets[:, -1:]], dim=1)
        acc = (logits.argmax(-1) == targets).float().mean().item()
        slices = {f"Q{i + 1}": c.mean().item() for i, c in enumerate(nll.chunk(BUCKETS, 1))}
        baselines = {}
        for name, probs in count_predictors(seq, self.states, self.alpha).items():
            base = -probs.gather(-1, targets[..., None]).squeeze(-1).log()
            baselines[name] = {f"Q{i + 1}": c.mean().item()
                               for i, c in enumerate(base.chunk(BUCKETS, 1))}
            baselines[name]["all"] = base.mean().item()
        return Evaluation({"loss": nll.mean().item(), "accuracy": acc,
                           "bayes_loss": baselines["bayes"]["all"],
                           "uniform_loss": math.log(self.states)}, slices, baselines)


def _gamma_from_uniform(u: Tensor, alpha: float) -> Tensor:
    """Gamma(alpha, 1) samples by inverting the CDF numerically (bisection, float64).

    torch's Gamma sampler takes no generator; this keeps every draw on the run's seed.
    """
    u = u.double()
    lo = torch.zeros_like(u)
    hi = torch.full_like(u, 50.0 + 10 * alpha)
    a = torch.tensor(alpha, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = torch.special.gammainc(a, mid) < u
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return ((lo + hi) / 2).float()
