"""Three head-level interventions that make a model rely more on a context segment, each
against the same intervention on random heads (the control), on MiniLM.

The setting, the closest text analogue of the papers' image + text inputs: each input is a
docstring's first sentence S1 followed by its second sentence S2 (the segment, the
"context" whose content the model should use). Reliance on the segment, per input,

    R = cos(e(S1 S2), e(S2)) - cos(e(S1 S2), e(S1)),

with e the sentence embedding (mean-pooled, L2-normalised) and e(S1), e(S2) those of the
sentences alone under the unedited model. An intervention's effect is the change of R.
Heads are chosen on separate selection pairs:

- VHR (head divergence, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
  Divergence"): the ``count`` heads whose outputs on S1's tokens change most when S2 is
  removed; their outputs scaled by ``factor``.
- Modulation ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination"): the same
  segment-sensitive heads; ``amount`` of their mass outside S2 moved onto S2.
- VAR ("See What You Are Told"): sink tokens from massive activations; the ``count`` heads
  that attend most to S2 (from S1's tokens); ``share`` of the sinks' mass moved onto S2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference
from attnlab.heads.ablate import scale_heads
from attnlab.heads.analysis import grid_rows
from attnlab.heads.selection import head_divergence, random_heads, segment_attention, top_heads
from attnlab.heads.sinks import massive_activations
from attnlab.heads.steer import edit_weights, redistribute, shift_toward

__all__ = ["SegmentInputs", "segment_divergence", "sink_tokens", "steering_study"]

Tick = Callable[[], None] | None


class SegmentInputs:
    """A padded batch of [CLS] S1 S2 [SEP] (``batch``), its ``segment`` mask (S2's tokens),
    ``before`` mask (S1's tokens and [CLS]), and the pieces alone (``first``, ``second``:
    [CLS] S [SEP]) for the reference embeddings and the divergence."""

    def __init__(self, tokenizer: Any, pairs: list[tuple[str, str]], limit: int = 60) -> None:
        cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.pieces = [(tokenizer(a, add_special_tokens=False)["input_ids"][:limit],
                        tokenizer(b, add_special_tokens=False)["input_ids"][:limit])
                       for a, b in pairs]
        self.cls, self.sep, self.pad = cls, sep, pad
        rows = [[cls, *a, *b, sep] for a, b in self.pieces]
        self.batch = self._padded(rows)
        length = self.batch["input_ids"].shape[1]
        self.segment = torch.zeros(len(rows), length, dtype=torch.bool)
        self.before = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (a, b) in enumerate(self.pieces):
            self.before[i, :1 + len(a)] = True
            self.segment[i, 1 + len(a):1 + len(a) + len(b)] = True
        self.first = self._padded([[cls, *a, sep] for a, _ in self.pieces])
        self.second = self._padded([[cls, *b, sep] for _, b in self.pieces])

    def _padded(self, rows: list[list[int]]) -> dict[str, Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def single(self, i: int, with_segment: bool) -> dict[str, Tensor]:
        a, b = self.pieces[i]
        ids = [self.cls, *a, *(b if with_segment else []), self.sep]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                              dtype=torch.long)}


def _embed(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    from attnlab.integrations.hf import mean_pooled

    with torch.no_grad():
        return mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"])


def segment_divergence(model: torch.nn.Module, data: SegmentInputs, tick: Tick = None
                       ) -> Tensor:
    """(layers, heads) head divergence on S1's tokens ([CLS] included) with and without S2,
    averaged over the pairs of ``data``."""
    total: Tensor | float = 0
    for i, (a, _) in enumerate(data.pieces):
        keep = torch.arange(1 + len(a))
        total = total + head_divergence(model, lambda i=i: model(**data.single(i, True)),
                                        lambda i=i: model(**data.single(i, False)), keep, keep)
        if tick:
            tick()
    return cast(Tensor, total / len(data.pieces))  # a tensor: there are pieces


def sink_tokens(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, list[int]]:
    """(B, L) sink tokens and the sink dimensions, as VAR finds them: the dimensions of the
    first token's massive activations (the known sink: [CLS]), and every token with a massive
    activation in those dimensions, in any intermediate layer's hidden state."""
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    found = torch.zeros_like(mask)
    dims: set[int] = set()
    for h in hidden[1:-1]:
        first = massive_activations(h[:, :1], key_mask=mask[:, :1]).dims
        if first:
            dims.update(first)
            found |= massive_activations(h, key_mask=mask, dims=first).tokens
    return found, sorted(dims)


def steering_study(count: int = 8, factor: float = 2.0, amount: float = 0.3,
                   share: float = 0.5, draws: int = 10, selection_pairs: int = 64,
                   seed: int = 0, tick: Tick = None) -> tuple[dict[str, Any], list, dict]:
    """VHR, modulation and VAR on MiniLM against random heads of the same ``count`` (mean
    over ``draws`` random sets per input); 95% intervals over the held-out inputs."""
    from attnlab.heads.text import docstring_pairs
    from attnlab.integrations.hf import load_minilm

    model, tokenizer = load_minilm()
    pairs = docstring_pairs(seed)
    if len(pairs) <= selection_pairs + 10:
        raise ValueError(f"only {len(pairs)} docstring pairs; ask for fewer selection pairs")
    chosen_on = SegmentInputs(tokenizer, pairs[:selection_pairs])
    held = SegmentInputs(tokenizer, pairs[selection_pairs:])

    divergence = segment_divergence(model, chosen_on, tick)
    queries = chosen_on.before & chosen_on.batch["attention_mask"].bool()
    attention = segment_attention(model, lambda: model(**chosen_on.batch), chosen_on.segment,
                                  queries)
    sinks, sink_dims = sink_tokens(model, held.batch)
    sinks &= ~held.segment
    segment = held.segment

    def vhr(heads: list[tuple[int, int]]) -> contextlib.AbstractContextManager:
        return scale_heads(model, heads, factor)

    def modulation(heads: list[tuple[int, int]]) -> contextlib.AbstractContextManager:
        return edit_weights(model, heads, lambda w: shift_toward(w, segment, amount))

    def var(heads: list[tuple[int, int]]) -> contextlib.AbstractContextManager:
        return edit_weights(model, heads, lambda w: redistribute(w, sinks, segment, share))

    methods = {"VHR": (vhr, top_heads(divergence, count),
                       f"output x {factor} on the {count} most divergent heads"),
               "modulation": (modulation, top_heads(divergence, count),
                              f"{amount} of the mass outside S2 moved onto S2 in the {count} "
                              "most divergent heads"),
               "VAR": (var, top_heads(attention, count),
                       f"{share} of the sinks' mass moved onto S2 in the {count} heads that "
                       "attend most to S2")}

    e_first, e_second = _embed(model, held.first), _embed(model, held.second)
    plain = _embed(model, held.batch)

    def reliance(e: Tensor) -> Tensor:
        return (e * e_second).sum(-1) - (e * e_first).sum(-1)

    base = reliance(plain)
    generator = torch.Generator().manual_seed(seed)
    numbers: dict[str, Any] = {"count": count, "inputs": len(held.pieces),
                               "selection_pairs": selection_pairs, "draws": draws,
                               "reliance_plain": fmt_list(base),
                               "divergence": divergence.tolist(),
                               "segment_attention": attention.tolist(),
                               "sink_positions": sorted(set(sinks.nonzero()[:, 1].tolist())),
                               "sink_dims": sink_dims, "sinks": int(sinks.sum())}
    rows = []
    for name, (context, heads, what) in methods.items():
        with context(heads):
            edited = _embed(model, held.batch)
        effect = reliance(edited) - base
        controls, kept = [], []
        for _ in range(draws):
            with context(random_heads(model, count, generator)):
                e = _embed(model, held.batch)
            controls.append(reliance(e) - base)
            kept.append((e * plain).sum(-1))
            if tick:
                tick()
        control = torch.stack(controls).mean(0)
        diff = effect - control
        numbers[name] = {"heads": heads, "what": what, "effect": effect.tolist(),
                         "control": control.tolist(),
                         "embedding_cosine": float((edited * plain).sum(-1).mean()),
                         "control_embedding_cosine": float(torch.stack(kept).mean())}
        rows.append([name, what, ", ".join(f"L{a}h{b}" for a, b in heads),
                     fmt(*mean_ci(effect.tolist()), 3), fmt(*mean_ci(control.tolist()), 3),
                     fmt_paired(paired_difference(dict(enumerate(effect.tolist())),
                                                  dict(enumerate(control.tolist())))),
                     f"{float((diff > 0).float().mean()):.0%}",
                     f"{numbers[name]['embedding_cosine']:.3f} / "
                     f"{numbers[name]['control_embedding_cosine']:.3f}"])
    header = ["method", "intervention", "heads", "effect on R [95% CI]",
              f"random heads ({draws} sets)", "method - random [95% CI]",
              "inputs where method > random", "embedding cos to unedited (method / random)"]
    sink_note = (f"sink tokens: massive activation (tau = 20 sqrt(D / 4096)) in the sink "
                 f"dimensions {sink_dims} (those of the first token's); {int(sinks.sum())} "
                 f"found, at positions {numbers['sink_positions']} (0 = [CLS])")
    sections = [
        ("Effect on reliance on the segment (mean ± 95% CI over held-out inputs)", [
            ("list", [f"reliance R = cos(e(S1 S2), e(S2)) - cos(e(S1 S2), e(S1)); unedited "
                      f"mean {fmt(*mean_ci(base.tolist()), 3)} over {len(held.pieces)} "
                      "held-out pairs", f"heads chosen on {selection_pairs} other pairs; the "
                      f"control applies the same edit to {count} random heads, {draws} sets "
                      "averaged per input", sink_note]),
            ("table", (header, rows))]),
        ("Head divergence (VHD) and attention to the segment, per head", [
            ("table", grid_rows(divergence, corner="VHD")),
            ("table", grid_rows(attention, corner="mass on S2"))])]
    return numbers, sections, {}


def fmt_list(values: Tensor) -> list[float]:
    return [round(float(v), 6) for v in values]
