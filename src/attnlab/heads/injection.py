"""Soft injection of task embeddings ("Soft Injection of Task Embeddings Outperforms
Prompt-Based In-Context Learning").

A task embedding is each head's output at the prompt's last position, averaged over
few-shot prompts of one task: m_{l,h} = mean_p a_{l,h}(p)[-1]. Injecting it into another
prompt (a zero-shot one) mixes it into that prompt's head outputs at its last position,

    a'_{l,h} = (1 - alpha_{l,h}) a_{l,h} + alpha_{l,h} m_{l,h},   alpha_{l,h} in [0, 1],

before the output projection, in every layer at once. The per-head mixing weights alpha
are learned on a few labelled zero-shot examples of the task (cross-entropy of the answer,
the model frozen): ``fit_injection``. Head outputs are ``hook_heads`` (B, L, H, D), so this
works on attnlab models and on Hugging Face models prepared with ``use_attnlab``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.heads.ablate import head_outputs
from attnlab.heads.sites import forward_hooks, sites

__all__ = ["InjectionFit", "fit_injection", "inject", "task_embedding"]

Embedding = Mapping[int, Tensor]  # layer -> (H, D)


def task_embedding(model: nn.Module, run: Callable[[], object],
                   position: int = -1) -> dict[int, Tensor]:
    """Every layer's head outputs at ``position`` averaged over the batch of ``run()`` (one
    forward over few-shot prompts of one task, all of one length): {layer: (H, D)}."""
    return {layer: out[:, position].float().mean(0)
            for layer, out in head_outputs(model, run).items()}


@contextlib.contextmanager
def inject(model: nn.Module, embedding: Embedding, weights: Mapping[int, Tensor],
           position: int = -1) -> Iterator[None]:
    """Inside the block, each layer's head outputs at ``position`` become (1 - alpha) a +
    alpha m, with m = ``embedding[layer]`` (H, D) and alpha = ``weights[layer]`` (H,) in
    [0, 1]. Layers missing from ``weights`` are left alone; ``weights`` may require grad
    (``fit_injection`` learns them through this)."""
    model_sites = sites(model)
    for layer, alpha in weights.items():
        if layer not in embedding:
            raise ValueError(f"weights for layer {layer}, which the embedding lacks "
                             f"(it has layers {sorted(embedding)})")
        if not 0 <= layer < len(model_sites):
            raise ValueError(f"layer {layer} out of range: the model has "
                             f"{len(model_sites)} attention layers")
        heads = model_sites[layer].heads
        if alpha.shape != (heads,) or embedding[layer].shape[0] != heads:
            raise ValueError(f"layer {layer} has {heads} heads: weights must be ({heads},) "
                             f"and the embedding ({heads}, D); got {tuple(alpha.shape)} and "
                             f"{tuple(embedding[layer].shape)}")

    def mixing(task: Tensor, alpha: Tensor) -> Callable[..., Tensor]:
        def mix(_m, _i, out: Tensor) -> Tensor:
            a = alpha.to(out.device, out.dtype)[:, None]  # (H, 1)
            m = task.to(out.device, out.dtype)
            mixed = (1 - a) * out[:, position] + a * m
            out = out.clone()
            out[:, position] = mixed
            return out
        return mix

    hooks = {layer: mixing(embedding[layer], alpha) for layer, alpha in weights.items()}
    with forward_hooks(model_sites, "heads", hooks):
        yield


@dataclass
class InjectionFit:
    """Learned mixing weights ``weights`` {layer: (H,)} in [0, 1] and the training loss
    before the first step and after each (``losses``)."""

    weights: dict[int, Tensor]
    losses: list[float]


def fit_injection(model: nn.Module, embedding: Embedding,
                  logits_of: Callable[[], Tensor], answers: Tensor, *, steps: int = 100,
                  lr: float = 0.1, init: float = 0.5, position: int = -1) -> InjectionFit:
    """Learn alpha_{l,h} = sigmoid(theta_{l,h}) (every head of every layer of the embedding,
    starting at ``init``) by Adam on the cross-entropy of ``answers`` (B,) under the logits
    at the last position of ``logits_of()`` (B, L, V) with the embedding injected; the
    model's weights stay as they are."""
    if not 0.0 < init < 1.0:
        raise ValueError(f"init must be in (0, 1), got {init}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    model_sites = sites(model)
    start = math.log(init / (1 - init))
    theta = {layer: torch.full((model_sites[layer].heads,), start, requires_grad=True)
             for layer in embedding}
    optimiser = torch.optim.Adam(theta.values(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    losses = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for step in range(steps + 1):
            weights = {layer: t.sigmoid() for layer, t in theta.items()}
            with inject(model, embedding, weights, position):
                logits = logits_of()[:, -1].float()
            loss = F.cross_entropy(logits, answers.to(logits.device))
            losses.append(loss.item())
            if step == steps:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return InjectionFit({layer: t.detach().sigmoid() for layer, t in theta.items()}, losses)
