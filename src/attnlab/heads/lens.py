"""Logit lens, per-head results and direct logit attribution for causal language models
(attnlab's ``TransformerLM``; Hugging Face GPT-2 and the Llama family: Llama, Mistral,
Qwen2, Phi-3, ...), built on the hook points of :mod:`attnlab.heads.points`.

``logit_lens`` reads the residual stream after every block through the model's own final norm
and unembedding. ``head_results`` splits each attention output into its heads: the slice of
the output projection's input that belongs to a head, through that head's columns of the
projection (the projection's bias belongs to no head). ``direct_logit_attribution`` writes
a logit direction (one token's logit, a difference of two, or any vector over the vocabulary)
at one position as a sum over the pieces that built the final residual: the embeddings, each
block's attention (each head, and the projection's bias), each MLP, and a constant bias term;
the final norm's scale is frozen at its value on this input, which makes the norm linear, so
the sum is exact (see :class:`LogitAttribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.heads.metrics import Inputs
from attnlab.heads.points import (
    BlockParts,
    Layout,
    Positions,
    layout,
    out_projection,
    run_with_cache,
)

__all__ = ["LogitAttribution", "direct_logit_attribution", "head_results", "logit_lens"]

Forward = Callable[[nn.Module, Inputs], Tensor]
Target = Tensor | int | tuple[Tensor | int, Tensor | int]


def _lm_layout(model: nn.Module, what: str) -> Layout:
    lay = layout(model)
    if lay.final_norm is None or lay.unembed is None:
        missing = " and ".join(n for n, m in (("final norm", lay.final_norm),
                                              ("unembedding", lay.unembed)) if m is None)
        raise ValueError(f"{what} reads a causal language model through its final norm and "
                         f"unembedding; {type(model).__name__} has no {missing}")
    return lay


def _softcap(model: nn.Module) -> float | None:
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if isinstance(cap, int | float) and cap else None


def _check_last(lens_last: Tensor, logits: Tensor, what: str) -> None:
    """The lens of the last block must be the model's logits: else the model does something
    after its final norm and unembedding that the lens would silently leave out."""
    if lens_last.shape != logits.shape:
        raise ValueError(f"{what}: the model's logits {tuple(logits.shape)} do not match the "
                         f"lens' last layer {tuple(lens_last.shape)} (pass forward= returning "
                         "logits for every position)")
    a, b = lens_last.to(_wide(logits.device)), logits.to(_wide(logits.device))
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    # the same modules on the same residual, another matmul shape: rounding only (in 16-bit
    # dtypes this catches gross differences only)
    tol = 256 * torch.finfo(logits.dtype).eps * scale
    gap = float((a - b).abs().max()) if b.numel() else 0.0
    if gap > tol:
        raise ValueError(f"{what}: the final norm and unembedding applied to the last residual "
                         f"differ from the model's logits by {gap:.3g} (> {tol:.3g}): the model "
                         "changes its logits afterwards (a logit scale or cap attnlab does not "
                         "know), so the lens would not show what it computes")


def _select(t: Tensor, positions: Positions) -> Tensor:
    if positions is None:
        return t
    length = t.shape[1]
    if isinstance(positions, slice):
        index = list(range(length))[positions]
    elif isinstance(positions, int):
        index = [positions]
    else:
        index = [int(p) for p in positions]
    return t[:, torch.tensor([p % length for p in index], device=t.device)]


def logit_lens(model: nn.Module, inputs: Inputs, *, positions: Positions = None,
               forward: Forward | None = None, max_bytes: int | None = 1 << 30) -> Tensor:
    """(blocks + 1, B, P, vocab): the model's final norm and unembedding applied to ``embed``
    and to each ``blocks.{i}.resid_post`` (at ``positions``, default all: P = L). The last
    entry is the model's logits (checked: a model that changes its logits after the
    unembedding is refused; Gemma 2's final soft-capping is applied). The result holds
    (blocks + 1) x B x P x vocab numbers: choose ``positions`` on long inputs."""
    lay = _lm_layout(model, "logit_lens")
    names = ["embed", *(f"blocks.{p.index}.resid_post" for p in lay.blocks)]
    logits, cache = run_with_cache(model, inputs, names, positions=positions,
                                   max_bytes=max_bytes, forward=forward)
    stack = torch.stack([cache[n] for n in names])
    norm, unembed = lay.final_norm, lay.unembed
    assert norm is not None and unembed is not None  # _lm_layout checked
    with torch.no_grad():
        out = unembed(norm(stack))
        cap = _softcap(model)
        if cap is not None:
            out = torch.tanh(out / cap) * cap
    _check_last(out[-1], _select(logits.detach(), positions), "logit_lens")
    return out


def head_results(model: nn.Module, inputs: Inputs, *, blocks: Sequence[int] | None = None,
                 positions: Positions = None, forward: Forward | None = None,
                 max_bytes: int | None = 1 << 30) -> tuple[Tensor, ...]:
    """Each head's contribution to the residual stream, (B, P, H, dim) per block (``blocks``,
    default all, in that order): head h's slice of the output projection's input
    (``blocks.{i}.attn_z``, after gates and ``head_scale``) through its columns of the
    projection. Summed over heads, plus the projection's bias, they give
    ``blocks.{i}.attn_out`` (attnlab, pre-norm Hugging Face models), for BERT the
    attention's dense output, for Gemma 2/3 and OLMo-2 the input of the norm on the
    attention's output (their ``attn_out`` is after it). Refused (ValueError) for an
    attnlab mechanism whose output is not such a sum (see ``points.out_projection``)."""
    lay = layout(model)
    chosen = list(range(len(lay.blocks))) if blocks is None else [int(b) for b in blocks]
    projections = [out_projection(model, i, where=lay) for i in chosen]  # refusals first
    names = [f"blocks.{i}.attn_z" for i in chosen]
    _, cache = run_with_cache(model, inputs, names, positions=positions, max_bytes=max_bytes,
                              forward=forward)
    with torch.no_grad():
        return tuple(torch.einsum("...hd,ohd->...ho", cache[n], p.weight.to(cache[n].dtype))
                     for n, p in zip(names, projections, strict=True))


# ------------------------------------------------------------------- direct attribution
@dataclass
class LogitAttribution:
    """Direct logit attribution at one ``position``: how much each piece of the final residual
    moves the logit direction d (``d . logits``), per sequence of the batch (first axis B).

    ``embed`` (B,), ``attn`` (B, blocks): each block's attention output, ``heads`` (B, blocks,
    H): each head's part of it, ``attn_bias`` (B, blocks): the output projection's bias (so
    ``heads.sum(-1) + attn_bias == attn``), ``mlp`` (B, blocks), ``branches`` (B, blocks):
    attnlab residual branches (0 where a block has none), ``bias`` (B,): the final norm's
    bias and the unembedding's bias along d, ``total`` (B,): d . logits of the model.

    Each piece c contributes ``d . W_U (gamma * (c - mean(c)) / s)`` (LayerNorm; RMSNorm:
    ``gamma * c / s``), with the final norm's scale s (the standard deviation, or root mean
    square, plus eps, of the final residual of that sequence at that position) FROZEN at its
    value on this input. With s frozen the norm is affine, so ``embed + attn + mlp + branches
    (summed over blocks) + bias == total`` exactly, up to float rounding (``residual()``); the
    centring is applied to each piece, so no piece carries another's mean. What is not exact is
    the reading of a piece as its effect: removing a piece would change s too."""

    embed: Tensor
    attn: Tensor
    heads: Tensor
    attn_bias: Tensor
    mlp: Tensor
    branches: Tensor
    bias: Tensor
    total: Tensor
    position: int
    norm: str

    def residual(self) -> Tensor:
        """(B,): ``total`` minus the sum of the parts (rounding only)."""
        parts = self.embed + self.attn.sum(-1) + self.mlp.sum(-1) + self.branches.sum(-1)
        return self.total - (parts + self.bias)

    def top_heads(self, k: int = 5) -> list[tuple[tuple[int, int], float]]:
        """The ``k`` heads of largest mean |attribution| over the batch: ((block, head),
        mean attribution)."""
        mean = self.heads.mean(0).nan_to_num(0.0)
        order = mean.flatten().abs().argsort(descending=True)[:k]
        h = mean.shape[1]
        return [((int(o) // h, int(o) % h), float(mean.flatten()[o])) for o in order]

    def table(self, heads: int = 3) -> str:
        """A plain-text table of the batch means: one row per block (attention, MLP, its
        ``heads`` largest heads), then the embeddings, the bias, the sum and the model's
        total."""
        m = lambda t: float(t.float().mean())  # noqa: E731
        lines = [f"{'piece':<10} {'attn':>9} {'mlp':>9}  top heads"]
        for i in range(self.attn.shape[1]):
            per_head = self.heads[:, i].mean(0).nan_to_num(0.0)
            top = per_head.abs().argsort(descending=True)[:heads]
            names = ", ".join(f"H{int(h)} {float(per_head[h]):+.3f}" for h in top)
            extra = f"  branches {m(self.branches[:, i]):+.3f}" \
                if bool(self.branches[:, i].any()) else ""
            lines.append(f"block {i:<4} {m(self.attn[:, i]):>+9.3f} {m(self.mlp[:, i]):>+9.3f}"
                         f"  {names}{extra}")
        lines += [f"{'embed':<10} {m(self.embed):>+9.3f}",
                  f"{'bias':<10} {m(self.bias):>+9.3f}",
                  f"{'sum':<10} {m(self.total - self.residual()):>+9.3f}",
                  f"{'model':<10} {m(self.total):>+9.3f}  (position {self.position}, final "
                  f"{self.norm} scale frozen)"]
        return "\n".join(lines)


def _wide(device: torch.device) -> torch.dtype:
    """The dtype the attribution is computed in: float64 (float32 where the device has no
    float64: MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _direction(target: Target, batch: int, vocab: int, device: torch.device) -> Tensor:
    """(B, vocab) in ``_wide``: the logit direction d of ``target``."""
    def one_hot(tokens: Tensor | int) -> Tensor:
        t = torch.as_tensor(tokens, device=device)
        if t.is_floating_point() or t.dim() > 1:
            raise ValueError(f"token ids must be an int or a (B,) integer tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        t = t.long().expand(batch) if t.dim() == 0 else t.long()
        if t.shape != (batch,):
            raise ValueError(f"{t.numel()} token ids for a batch of {batch}")
        if bool(((t < 0) | (t >= vocab)).any()):
            raise ValueError(f"token ids must be in 0..{vocab - 1}, got {t.tolist()}")
        return nn.functional.one_hot(t, vocab).to(_wide(device))

    if isinstance(target, tuple):
        if len(target) != 2:
            raise ValueError("a tuple target is (correct, wrong) token ids")
        return one_hot(target[0]) - one_hot(target[1])
    if isinstance(target, Tensor) and target.is_floating_point():
        if target.shape[-1] != vocab or target.dim() not in (1, 2) or \
                (target.dim() == 2 and target.shape[0] != batch):
            raise ValueError(f"a direction is (vocab,) or (B, vocab) = ({batch}, {vocab}), got "
                             f"{tuple(target.shape)}")
        return target.to(device, _wide(device)).expand(batch, vocab)
    return one_hot(target)


def _frozen_norm(norm: nn.Module, x: Tensor, y: Tensor) -> tuple[str, Tensor, Tensor | None,
                                                                   Tensor]:
    """(kind, gamma (D,), beta (D,) or None, s (B, 1)) with y == gamma * (x [- mean]) / s
    [+ beta], read from the final norm and checked against its output ``y`` on ``x``."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    eps = next((float(v) for v in (getattr(norm, n, None) for n in
                                   ("eps", "variance_epsilon", "epsilon"))
                if isinstance(v, int | float)), 0.0)
    wide = _wide(x.device)
    x = x.to(wide)
    d = x.shape[-1]
    gamma0 = torch.ones(d, dtype=wide, device=x.device) if not isinstance(
        weight, Tensor) else weight.detach().to(wide)
    if isinstance(bias, Tensor) or isinstance(norm, nn.LayerNorm):
        kinds = [("LayerNorm", gamma0)]
    else:  # RMSNorm: Llama's weight * x / rms, Gemma's (1 + weight) * x / rms
        kinds = [("RMSNorm", gamma0), ("RMSNorm", 1 + gamma0)]
    beta = bias.detach().to(wide) if isinstance(bias, Tensor) else None
    tol = 256 * torch.finfo(y.dtype).eps * max(1.0, float(y.abs().max()))
    readings = []
    for kind, gamma in kinds:
        centred = x - x.mean(-1, keepdim=True) if kind == "LayerNorm" else x
        s = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        rebuilt = gamma * centred / s + (0 if beta is None else beta)
        readings.append((float((rebuilt - y.to(wide)).abs().max()), kind, gamma, s))
    gap, kind, gamma, s = min(readings, key=lambda r: r[0])
    if gap <= tol:
        return kind, gamma, beta, s
    raise ValueError(f"the final norm {type(norm).__name__} is neither a LayerNorm nor an "
                     "RMSNorm as attnlab reads it (its output differs): direct logit "
                     "attribution cannot freeze its scale")


def direct_logit_attribution(model: nn.Module, inputs: Inputs, target: Target, *,
                             position: int = -1, forward: Forward | None = None
                             ) -> LogitAttribution:
    """Direct logit attribution of ``target`` at ``position`` (see
    :class:`LogitAttribution`): ``target`` is ``(correct, wrong)`` token ids (the logit
    difference; each an int or one per sequence), one token id (its logit), or a float
    direction over the vocabulary, (vocab,) or (B, vocab). The final norm's scale is frozen
    from this run. Needs a pre-norm residual stack with a final norm and an unembedding
    (attnlab ``TransformerLM``; GPT-2, Llama family); refuses post-norm models, final logit
    soft-capping and final norms it cannot read."""
    lay = _lm_layout(model, "direct_logit_attribution")
    if lay.family == "post-norm":
        raise ValueError(f"{type(model).__name__} is post-norm: its residual stream is not a "
                         "sum of the sublayers' outputs, so there is nothing to attribute to")
    if lay.family == "sandwich":
        raise ValueError(f"{type(model).__name__} norms each attention output before adding "
                         "it (Gemma 2/3, OLMo-2): its heads do not sum to what reaches the "
                         "residual, so per-head attribution does not apply")
    if _softcap(model) is not None:
        raise ValueError(f"{type(model).__name__} soft-caps its logits (tanh), which is not "
                         "linear: direct logit attribution does not apply")
    n = len(lay.blocks)
    names = ["embed", "final_norm", f"blocks.{n - 1}.resid_post"]
    for p in lay.blocks:
        names += [f"blocks.{p.index}.{k}" for k in _parts(p, "attn_z")]
        names += [f"blocks.{p.index}.{place}_out" for place in p.branches]
    projections = [out_projection(model, p.index, where=lay) for p in lay.blocks]
    logits, cache = run_with_cache(model, inputs, names, positions=[position], forward=forward)
    got = {k: t[:, 0] for k, t in cache.items()}  # the one position
    final = got[f"blocks.{n - 1}.resid_post"]
    batch, vocab = logits.shape[0], logits.shape[-1]
    unembed = lay.unembed
    assert lay.final_norm is not None and unembed is not None  # _lm_layout checked
    with torch.no_grad():
        _check_last(unembed(got["final_norm"]), logits[:, position].detach(),
                    "direct_logit_attribution")
    _check_sum(got, lay, final)
    kind, gamma, beta, s = _frozen_norm(lay.final_norm, final, got["final_norm"])
    d = _direction(target, batch, vocab, logits.device)
    wide = d.dtype
    u = _readout(d, unembed)  # (B, D): d in the space the unembedding reads
    r = gamma * u / s  # (B, D): the residual direction of d
    if kind == "LayerNorm":
        r = r - r.mean(-1, keepdim=True)  # c . r_centred == (c - mean c) . r
    b_u = getattr(unembed, "bias", None)
    bias = u @ beta if beta is not None else torch.zeros(batch, dtype=wide, device=r.device)
    if isinstance(b_u, Tensor):
        bias = bias + d @ b_u.detach().to(wide)

    def along(t: Tensor) -> Tensor:
        return (t.to(wide) * r).sum(-1)

    widest = max(p.heads for p in projections)
    heads = torch.full((batch, n, widest), float("nan"), dtype=wide, device=r.device)
    attn, attn_bias, mlp, branches = (torch.zeros(batch, n, dtype=wide, device=r.device)
                                      for _ in range(4))
    for p, proj in zip(lay.blocks, projections, strict=True):
        i = p.index
        z = got[f"blocks.{i}.attn_z"].to(wide)  # (B, H, Dh)
        heads[:, i, :proj.heads] = torch.einsum("bhd,ohd,bo->bh", z,
                                                proj.weight.detach().to(wide), r)
        if proj.bias is not None:
            attn_bias[:, i] = r @ proj.bias.detach().to(wide)
        attn[:, i] = along(got[f"blocks.{i}.attn_out"])
        if p.mlp is not None:  # an attention-only block adds no MLP output (0)
            mlp[:, i] = along(got[f"blocks.{i}.mlp_out"])
        for place in p.branches:
            branches[:, i] += along(got[f"blocks.{i}.{place}_out"])
    total = (logits[:, position].detach().to(wide) * d).sum(-1)
    return LogitAttribution(along(got["embed"]).float(), attn.float(), heads.float(),
                            attn_bias.float(), mlp.float(), branches.float(), bias.float(),
                            total.float(), position, kind)


def _parts(block: BlockParts, *extra: str) -> list[str]:
    """The points of ``block`` whose outputs are added to the residual (``attn_out``,
    ``mlp_out`` unless the block has no MLP, its branches' ``*_out``), then ``extra``."""
    names = ["attn_out", *(["mlp_out"] if block.mlp is not None else []),
             *(f"{place}_out" for place in block.branches)]
    return [*names, *extra]


def _check_sum(got: dict[str, Tensor], lay: Layout, final: Tensor) -> None:
    """The pieces must add up to the final residual: else the model scales or transforms
    them on their way into the residual (a residual multiplier, a norm) and their
    attributions would not be what reaches the logits."""
    wide = _wide(final.device)
    total = got["embed"].to(wide)
    for p in lay.blocks:
        for k in _parts(p):
            total = total + got[f"blocks.{p.index}.{k}"].to(wide)
    scale = max(1.0, float(final.abs().max()))
    gap = float((total - final.to(wide)).abs().max())
    tol = 256 * torch.finfo(final.dtype).eps * scale
    if gap > tol:
        raise ValueError(f"the embeddings, attention and MLP outputs differ from the final "
                         f"residual by {gap:.3g} (> {tol:.3g}): this model scales or transforms "
                         "them before adding them to the residual, so their direct attributions "
                         "would not be what reaches the logits")


def _readout(d: Tensor, unembed: nn.Module, chunk: int = 8192) -> Tensor:
    """(B, D): ``d @ W_U`` in d's dtype, reading the unembedding's weight (vocab, D) a chunk
    of rows at a time (a large vocabulary is never copied whole into float64)."""
    weight: Any = getattr(unembed, "weight", None)
    if not isinstance(unembed, nn.Linear) or not isinstance(weight, Tensor):
        raise ValueError(f"the unembedding {type(unembed).__name__} is not an nn.Linear")
    out = d.new_zeros(d.shape[0], weight.shape[1])
    for start in range(0, weight.shape[0], chunk):
        rows = d[:, start:start + chunk]
        if bool(rows.any()):
            out += rows @ weight[start:start + chunk].detach().to(d.dtype)
    return out
