"""Edit the attention maps of chosen heads at inference: the weight edits behind the
papers' head-level interventions. Each edit keeps every row's total mass and never puts
weight on a key the row could not see (masked keys keep 0).

- ``shift_toward(w, group, amount)``: head modulation toward a token group ("Fixing
  Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision Language
  Model"): a fraction ``amount`` of the mass outside the group moves onto the group, in
  proportion to the group's own weights, so the group's mass m becomes m + amount (1 - m).
- ``redistribute(w, sources, targets, share)``: VAR ("See What You Are Told: Visual Attention
  Sink in Large Multimodal Models"): a fraction ``share`` of the mass on the sink tokens
  ``sources`` is recycled onto the ``targets``, in proportion to their weights.
- ``toward_identity(w, strength)``: SoftPAG ("Fine-Grained Perturbation Guidance via
  Attention Head Selection"): A' = (1 - u) A + u I, the map moved toward the identity.

``edit_weights(model, heads, edit)`` applies any such edit to chosen heads inside a
``with`` block (through ``hook_weights``, whose output becomes ``weights @ v``), on attnlab
models and on Hugging Face models prepared with ``use_attnlab``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from attnlab.heads.sites import HeadSelection, by_layer, forward_hooks, head_pairs, sites

__all__ = ["edit_weights", "redistribute", "shift_toward", "toward_identity"]

Edit = Callable[[Tensor], Tensor]


def _keys(mask: Tensor, w: Tensor) -> Tensor:
    """A (Lk,) or (B, Lk) key mask as (B or 1, 1, 1, Lk) floats aligned to ``w``'s keys."""
    if mask.dim() not in (1, 2) or mask.shape[-1] != w.shape[-1]:
        raise ValueError(f"a key mask must be (Lk,) or (B, Lk) with Lk = {w.shape[-1]}, got "
                         f"{tuple(mask.shape)}")
    m = mask.to(w.device).to(w.dtype)
    return m.reshape(-1, 1, 1, w.shape[-1]) if m.dim() == 2 else m.reshape(1, 1, 1, -1)


def _move(w: Tensor, source: Tensor, target: Tensor, fraction: float) -> Tensor:
    """Take ``fraction`` of each row's mass on ``source`` keys and add it to the ``target``
    keys in proportion to their weights (rows with no target mass are left as they are)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the fraction moved must be in [0, 1], got {fraction}")
    on_source = (w * source).sum(-1, keepdim=True)
    on_target = (w * target).sum(-1, keepdim=True)
    movable = (on_target > 0).to(w.dtype)  # somewhere to put it
    moved = fraction * on_source * movable
    return (w - fraction * w * source * movable
            + moved * w * target / on_target.clamp_min(torch.finfo(w.dtype).tiny))


def shift_toward(w: Tensor, group: Tensor, amount: float) -> Tensor:
    """(B, H, Lq, Lk) weights with ``amount`` of the mass outside ``group`` ((Lk,) or (B, Lk)
    bool) moved onto it, in proportion to the group's weights: the group's mass m becomes
    m + amount (1 - m); rows that see no group key are unchanged."""
    inside = _keys(group, w)
    return _move(w, 1 - inside, inside, amount)


def redistribute(w: Tensor, sources: Tensor, targets: Tensor, share: float) -> Tensor:
    """VAR: ``share`` of the mass on the ``sources`` keys (the sink tokens) moved onto the
    ``targets`` keys in proportion to their weights; sources and targets must not overlap."""
    src, tgt = _keys(sources, w), _keys(targets, w)
    if bool((src * tgt).any()):
        raise ValueError("sources and targets overlap: a token cannot give and receive")
    return _move(w, src, tgt, share)


def toward_identity(w: Tensor, strength: float) -> Tensor:
    """SoftPAG: (1 - u) A + u I with u = ``strength`` in [0, 1]; queries are the last Lq keys
    (causal caches); I is scaled by each row's mass, so unnormalised maps keep their sums."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    lq, lk = w.shape[-2:]
    eye = torch.eye(lk, device=w.device, dtype=w.dtype)[lk - lq:]  # query i is key lk-lq+i
    return (1 - strength) * w + strength * eye * w.sum(-1, keepdim=True)


@contextlib.contextmanager
def edit_weights(model: nn.Module, heads: HeadSelection, edit: Edit) -> Iterator[None]:
    """Inside the block, the attention weights of ``heads`` (``{layer: [heads]}`` or
    ``[(layer, head)]``) are replaced by ``edit(w)``, w (B, h, Lq, Lk) those heads' weights;
    the other heads are untouched. The output is then computed as weights @ v."""
    model_sites = sites(model)
    chosen = by_layer(head_pairs(heads, model_sites))

    def replacing(index: Tensor) -> Callable[..., Tensor]:
        def replace(_m, _i, w):
            out = w.clone()
            idx = index.to(w.device)
            picked = w.index_select(1, idx)
            new = edit(picked)
            if new.shape != picked.shape:
                raise ValueError(f"the edit returned {tuple(new.shape)} for weights of "
                                 f"{tuple(picked.shape)}")
            out[:, idx] = new.to(w.dtype)
            return out
        return replace

    hooks = {layer: replacing(torch.tensor(hs)) for layer, hs in chosen.items()}
    with forward_hooks(model_sites, "weights", hooks):
        yield
