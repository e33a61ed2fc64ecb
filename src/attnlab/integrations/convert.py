"""Any registered attnlab mechanism inside a pretrained Hugging Face model.

``convert(model, "hedgehog")`` replaces every self-attention module of a transformers model
with a :class:`ConvertedAttention`: a module with the Hugging Face module's call signature
around an ``attnlab.Attention`` of the chosen mechanism, built for the layer's shape (heads,
key/value heads for GQA, head width, causal or bidirectional) and holding the pretrained
q, k, v and output projections (weights and biases, in the pretrained layout: a projection
without a bias gets none). A pretrained ``nn.Linear``'s parameters are shared, not copied
(the replaced module, kept as the teacher, uses the same tensors); GPT-2's fused Conv1D is
copied, transposed and split. Everything else the mechanism has (feature maps, gates,
temperatures, biases, convolutions) is new and initialised by the mechanism's constructor, as
its paper says; :func:`new_parameters` lists it. A mechanism whose output at initialisation
is softmax attention's gives the unchanged model.

Architectures (``ARCHITECTURES``): BERT (post-norm encoder: the module replaces the
``BertSelfAttention`` and takes ``BertSelfOutput.dense`` in as its output projection; the
dense's place becomes an ``nn.Identity``, dropout, residual and LayerNorm stay where they
are), GPT-2 (fused ``Conv1D`` q, k, v: stored transposed, split in three; the residual dropout
``resid_pdrop`` becomes the module's ``dropout``), Llama, Qwen2 and Mistral (RoPE with the
model's ``rope_theta``, default rope type only, checked against the model's own frequencies;
GQA; Qwen2's q, k, v biases; Mistral's and Qwen2's sliding window, which the attnlab module
does not implement: exact while a sequence fits in the window, refused beyond it).

The converted model keeps transformers' masks: each forward reads the key padding from the
model's attention mask (boolean or additive, 2-D or 4-D), checks that the mask is what
padding plus the module's causal rule give (a custom 4-D mask is refused) and hands attnlab
the (B, L) padding mask. ``attnlab.heads`` finds the attnlab modules (``sites(model)``), so
capture, ablation and the rest work on a converted model.

The cache (``use_cache``). A decoder converted to a mechanism that can decode (its registry
entry has ``decode=True``: softmax, hedgehog, linear, gated, sigmoid, ...) generates with
its attnlab decoding state instead of a KV cache: when transformers hands the layer a
``DynamicCache``, the layer keeps its :class:`~attnlab.core.state.State` in the cache, in
place of that layer's (empty) entry (a :class:`~attnlab.integrations.cache.StateCacheLayer`,
reporting the tokens consumed as the cache's length), and feeds the mechanism only the new
tokens (``state=``): a KV cache for softmax, an O(1)-per-token summary for a linear
mechanism. RoPE positions continue from the state's position, the padding of the cached
tokens stays in the state. The rule ``convert`` applies: a plain forward builds no
state (``config.use_cache = False``, as the unconverted path always had it: captures,
training and the microscope see the full forward); ``generate`` keeps the model's own
``generation_config.use_cache`` when the mechanism can decode, and ``model(...,
use_cache=True)`` (or a ``cache=``) runs the cached path; a mechanism that cannot decode
sets ``generation_config.use_cache = False`` too and refuses a cache (ValueError naming the
model class and the mechanism), while generating without one as before. Refused with a
cache, with the reason: a cache other than ``DynamicCache`` (static, quantized), cropping
the cache, so assisted and speculative decoding (an attnlab state cannot be rolled back),
and a sliding window overrun by cached plus new tokens. Beam search works: the cache
reorders, selects or repeats each state's sequences with ``State.select``.

Left padding. Hugging Face counts a row's positions from its first real token (a
left-padded batch, the usual way to batch prompts for ``generate``, passes such
``position_ids``). The converted layers hand position ids other than the default (0 .. L-1
after the cached tokens) to the mechanism as per-row positions (``positions=`` of
``attnlab.Attention``), with and without a cache, so each row of a left-padded batch
computes, and generates, what it computes alone: RoPE rotates each row by its positions
(Llama, Qwen2, Mistral), and on GPT-2 (learned positions, added outside the attention) a
mechanism's own position terms (selective's temperature) read them. A RoPE model converted to
a mechanism that refuses per-row positions (its ``positions_refusal``: longheads) is refused
then, with the reason.

Conversion is atomic: every module is built (and every check made) before the model is
touched, so a failure leaves the model as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import attnlab.mechanisms  # noqa: F401  (registers the built-in mechanisms)
from attnlab.core.registry import available, build, info
from attnlab.integrations.cache import cache_slot
from attnlab.mechanisms.base import Attention
from attnlab.modules.rotary import Rotary

__all__ = ["ARCHITECTURES", "ConvertedAttention", "PretrainedRotary", "convert",
           "converted_modules", "extra_loss", "new_parameters", "pretrained_parameters",
           "teacher", "refusal"]

# the constructor arguments conversion sets from the pretrained model
SET_BY_MODEL = ("dim", "heads", "kv_heads", "head_dim", "causal", "bias", "rope", "rope_base",
                "dropout")
# why a mechanism's projections cannot hold a softmax model's q, k, v (by projection class)
PROJECTION_REASONS = {
    "SharedQKProjection": "its keys are its queries (one shared q = k map), a pretrained "
                          "model has separate q and k maps",
    "ValueProjection": "it mixes values without queries or keys, so the pretrained q and k "
                       "would be dropped",
    "InputValues": "it mixes the input tokens without q, k or v projections",
    "RandomFeatureProjection": "its queries are the input itself and its keys frozen random "
                               "features, not learned q and k maps",
    "CompressedConvProjection": "it compresses q, k and v into a latent of width "
                                "dim / compression through convolutions, which full-width "
                                "pretrained maps do not fit",
    "GatedInstanceProjection": "it pools instances through a gated attention network with "
                               "no keys or values of the pretrained shape",
    "PartialProjection": "it attends with a fraction of the channels through its own "
                         "normalised projections, not full-width q, k, v maps",
}

# mechanisms whose head layout itself differs from a pretrained model's (refused before
# building: their constructors reject the pretrained head shape)
LAYOUT_REASONS = {
    "shvit": "it attends with a fraction of the channels (partial heads of width "
             "partial * dim / heads) through its own normalised projections",
    "mil_attention": "it pools instances through gated attention branches that each read "
                     "every channel (head_dim = dim), with no keys of the pretrained shape",
}


@dataclass
class _Pretrained:
    """One layer's pretrained attention in attnlab's layout (weights (out, in))."""

    path: str  # where the converted module goes
    original: nn.Module  # the Hugging Face module it replaces (the teacher)
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    rope_base: float | None = None  # None: no RoPE
    rope_frequencies: Tensor | None = None  # the model's own inverse frequencies
    window: int | None = None  # sliding window (keys i - window < j <= i)
    dropout: float = 0.0
    layer_idx: int = 0
    # further modules to put in place with the converted one: path -> module
    also: dict[str, nn.Module] = field(default_factory=dict)
    originals_also: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """A model family ``convert`` maps: its transformers ``model_type`` and the function that
    reads each layer's pretrained attention (``layers(model)``)."""

    name: str
    model_type: str
    layers: Callable[[nn.Module], list[_Pretrained]]


def _who(model: nn.Module, mechanism: str) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__}" + (f" ({kind})" if kind else "") + f" -> {mechanism}"


def _linear(layer: Any) -> tuple[Tensor, Tensor | None]:
    """An ``nn.Linear``'s own weight and bias parameters (shared, not copied)."""
    bias = layer.bias if isinstance(layer.bias, Tensor) else None
    return layer.weight, bias


# ------------------------------------------------------------------------- architectures
def _bert_layers(model: nn.Module) -> list[_Pretrained]:
    config: Any = model.config
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={kind!r} (relative position scores in the "
                         "attention) is not reproduced; only 'absolute' is")
    out: list[_Pretrained] = []
    for path, m in model.named_modules():
        if not (hasattr(m, "self") and hasattr(m, "output") and
                hasattr(m.self, "query") and hasattr(m.output, "dense")):
            continue
        if getattr(m, "is_cross_attention", False):
            raise ValueError(f"{path} is cross-attention; convert maps self-attention only")
        self_attn, dense = m.self, m.output.dense
        heads = int(self_attn.num_attention_heads)
        head_dim = int(self_attn.attention_head_size)
        prefix = f"{path}." if path else ""
        out.append(_Pretrained(
            path=f"{prefix}self", original=self_attn, dim=int(config.hidden_size), heads=heads,
            kv_heads=heads, head_dim=head_dim, causal=bool(getattr(self_attn, "is_causal",
                                                                   False)),
            q=_linear(self_attn.query), k=_linear(self_attn.key), v=_linear(self_attn.value),
            o=_linear(dense), layer_idx=len(out),
            also={f"{prefix}output.dense": nn.Identity()},
            originals_also={f"{prefix}output.dense": dense}))
        _check_scaling(self_attn, head_dim, path)
    return out


def _gpt2_layers(model: nn.Module) -> list[_Pretrained]:
    config: Any = model.config
    if not getattr(config, "scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False (unscaled scores) is not reproduced")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_by_inverse_layer_idx=True (a score scale of 1 / layer) "
                         "is not reproduced")
    out: list[_Pretrained] = []
    for path, m in model.named_modules():
        if not (hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "split_size")):
            continue
        if getattr(m, "is_cross_attention", False):
            raise ValueError(f"{path} is cross-attention; convert maps self-attention only")
        dim, heads = int(m.embed_dim), int(m.num_heads)
        # Conv1D stores its weight (in, out): y = x W + b; attnlab's Linear holds (out, in)
        w, b = m.c_attn.weight.detach().t(), m.c_attn.bias.detach()  # copied below
        (qw, kw, vw), (qb, kb, vb) = w.split(dim, dim=0), b.split(dim, dim=0)
        out.append(_Pretrained(
            path=path, original=m, dim=dim, heads=heads, kv_heads=heads,
            head_dim=int(m.head_dim), causal=bool(m.is_causal), q=(qw, qb), k=(kw, kb),
            v=(vw, vb), o=(m.c_proj.weight.detach().t(), m.c_proj.bias.detach()),
            dropout=float(m.resid_dropout.p), layer_idx=len(out)))
        _check_scaling(m, int(m.head_dim), path)
    return out


class PretrainedRotary(Rotary):
    """attnlab's RoPE (half-split pairing, float32 angles, as Hugging Face's) with the
    pretrained model's inverse frequencies exactly as the model holds them: those of
    ``rope_theta`` computed in float32, rounded when the model was cast (``model.to(
    torch.bfloat16)`` rounds Hugging Face's ``inv_freq`` buffer, and the model rotates by the
    rounded values). ``reset_parameters`` and ``.to()`` keep them."""

    def __init__(self, head_dim: int, base: float, inv_freq: Tensor) -> None:
        self.__dict__["given"] = inv_freq.detach().float().cpu().clone()
        super().__init__(head_dim, base, float32_frequencies=True)

    def frequencies(self, device: torch.device | str | None = None) -> Tensor:
        given: Tensor = self.__dict__["given"]
        return given.to(torch.get_default_device() if device is None else device)


def _rope(model: nn.Module, head_dim: int) -> tuple[float, Tensor]:
    """The RoPE base and inverse frequencies of a Llama-family model, after checking that
    they are attnlab's float32 RoPE of that base (rounded to the dtype the model holds them
    in): default rope type, no attention scaling."""
    config: Any = model.config
    params = dict(getattr(config, "rope_parameters", None) or
                  getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} (RoPE scaling) is not reproduced; only the "
                         "'default' rope type is")
    base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    ours = Rotary(head_dim, base, float32_frequencies=True).inv_freq
    found = ours
    for path, m in model.named_modules():
        inv_freq = getattr(m, "inv_freq", None)
        if not isinstance(inv_freq, Tensor) or isinstance(m, Rotary):
            continue
        if float(getattr(m, "attention_scaling", 1.0)) != 1.0:
            raise ValueError(f"{path} scales cos and sin by {m.attention_scaling}, which attnlab's "
                             "RoPE does not reproduce")
        theirs = inv_freq.detach().cpu()
        if theirs.shape != ours.shape or not torch.equal(theirs, ours.to(theirs.dtype)):
            raise ValueError(f"{path}'s RoPE frequencies differ from attnlab's for "
                             f"rope_theta={base} (partial or scaled RoPE): not reproduced")
        found = theirs.float()
    return base, found


def _decoder_layers(model: nn.Module) -> list[_Pretrained]:
    config: Any = model.config
    out: list[_Pretrained] = []
    rope: tuple[float, Tensor] | None = None
    for path, m in model.named_modules():
        if not all(hasattr(m, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            continue
        head_dim = int(m.head_dim)
        heads = m.q_proj.out_features // head_dim
        kv_heads = m.k_proj.out_features // head_dim
        if rope is None:
            rope = _rope(model, head_dim)
        window = getattr(m, "sliding_window", getattr(config, "sliding_window", None)) \
            if config.model_type == "mistral" else getattr(m, "sliding_window", None)
        out.append(_Pretrained(
            path=path, original=m, dim=int(config.hidden_size), heads=heads,
            kv_heads=kv_heads, head_dim=head_dim, causal=bool(getattr(m, "is_causal", True)),
            q=_linear(m.q_proj), k=_linear(m.k_proj), v=_linear(m.v_proj),
            o=_linear(m.o_proj), rope_base=rope[0], rope_frequencies=rope[1],
            window=None if window is None else int(window), layer_idx=len(out)))
        _check_scaling(m, head_dim, path)
    return out


def _check_scaling(module: nn.Module, head_dim: int, path: str) -> None:
    scaling = getattr(module, "scaling", None)
    if scaling is not None and not math.isclose(float(scaling), head_dim ** -0.5,
                                                rel_tol=1e-12):
        raise ValueError(f"{path} scales its scores by {scaling}, not head_dim^-1/2: not "
                         "reproduced")


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("BERT", "bert", _bert_layers),
    Architecture("GPT-2", "gpt2", _gpt2_layers),
    Architecture("Llama", "llama", _decoder_layers),
    Architecture("Qwen2", "qwen2", _decoder_layers),
    Architecture("Mistral", "mistral", _decoder_layers),
)}


# ------------------------------------------------------------------------ the module
class ConvertedAttention(nn.Module):
    """A pretrained model's attention layer run by an attnlab mechanism (``self.attn``).

    Takes the Hugging Face module's call (``hidden_states`` and the keyword arguments its
    layer passes: ``attention_mask``, ``position_embeddings``, ``cache``, ...) and returns
    ``(output, None)``, the tuple the layer unpacks. ``pretrained`` names the parameters of
    ``attn`` that hold the pretrained projections; every other parameter of ``attn`` is the
    mechanism's own (new). ``teacher`` is the replaced Hugging Face module, or None when
    conversion dropped it: not a submodule (not in ``parameters()``, ``state_dict`` or
    ``sites``); it shares the pretrained ``nn.Linear`` parameters with ``attn`` (so it
    follows the model's ``.to()`` and sees updates to them), while GPT-2's teacher keeps its
    own Conv1D weights. ``teacher_parts``: other replaced modules by path (BERT's output
    dense, whose parameters ``attn.o_proj`` shares). ``model``: the converted model and
    mechanism, for messages. Given a transformers ``cache``, the call runs only the new tokens
    through ``attn`` with the layer's decoding state, kept in the cache (a
    :class:`~attnlab.integrations.cache.StateCacheLayer`; the module docstring's "The
    cache")."""

    teacher: nn.Module | None
    teacher_parts: dict[str, nn.Module]

    def __init__(self, attn: Attention, *, architecture: str, layer_idx: int,
                 window: int | None, pretrained: tuple[str, ...],
                 teacher: nn.Module | None = None,
                 teacher_parts: dict[str, nn.Module] | None = None,
                 model: str | None = None) -> None:
        super().__init__()
        self.attn = attn
        self.architecture, self.layer_idx, self.window = architecture, layer_idx, window
        # the converted model, for messages: "LlamaForCausalLM (llama) -> hedgehog"
        self.model_name = model if model is not None else f"{architecture} -> {attn.name}"
        self.pretrained = pretrained
        # plain attributes, not submodules (kept out of parameters(), state_dict and sites())
        self.__dict__["teacher"] = teacher
        self.__dict__["teacher_parts"] = dict(teacher_parts or {})

    @property
    def causal(self) -> bool:
        return bool(self.attn.causal)

    def extra_repr(self) -> str:
        window = f", window={self.window}" if self.window is not None else ""
        return f"{self.architecture} layer {self.layer_idx}{window}"

    def forward(self, hidden_states: Tensor, *args: Any, attention_mask: Tensor | None = None,
                position_embeddings: Any = None, position_ids: Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, past_key_value: Any = None,
                encoder_hidden_states: Tensor | None = None,
                output_attentions: bool | None = None,
                **kwargs: Any) -> tuple[Tensor, None]:
        who = f"{self.attn.name} in {self.architecture} layer {self.layer_idx}"
        if args:
            raise ValueError(f"{who}: unexpected positional arguments after hidden_states "
                             "(the converted module takes the rest by keyword)")
        given = [c for c in (cache, past_key_values, past_key_value) if c is not None]
        if encoder_hidden_states is not None:
            raise ValueError(f"{who}: cross-attention (encoder_hidden_states) is not converted")
        if output_attentions:
            raise ValueError(f"{who}: output_attentions is not returned by a converted model; "
                             "read the weights with attnlab.heads.capture (L<layer>.weights)")
        from attnlab.integrations.hf import METADATA  # here: hf.py may re-export convert

        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in METADATA
                         and k != "use_cache")
        if unknown:
            raise ValueError(f"{who}: got {', '.join(unknown)}, which the converted module "
                             "does not implement")
        if given:
            return self._cached(hidden_states, given[0], attention_mask, position_ids,
                                who), None
        length = hidden_states.shape[1]
        if self.window is not None and length > self.window:
            raise ValueError(f"{self.model_name}: {who}: the pretrained layer attends within a "
                             "sliding window of "
                             f"{self.window} keys, which attnlab modules do not implement: "
                             f"exact up to {self.window} tokens, got {length}")
        positions = self._positions(position_ids, hidden_states, 0, who)
        keep = _key_padding(attention_mask, hidden_states.shape[0], length, self.causal,
                            self.window, who)
        return self.attn(hidden_states, mask=keep, positions=positions), None

    def _positions(self, position_ids: Tensor | None, hidden_states: Tensor, past: int,
                   who: str, default_is_none: bool = True) -> Tensor | None:
        """Hugging Face's ``position_ids`` as the attnlab module's ``positions=``: None when
        they are the default (the ``past`` cached tokens, then past .. past + L - 1, which
        attnlab counts itself) or the module reads no positions it would accept (no RoPE,
        and a mechanism that refuses them), else (L,) or (B, L) (a left-padded batch: each
        row counts from its first real token). GPT-2's positions are in its embeddings, not
        in the attention, but a mechanism's own position terms (selective's temperature)
        read them here too. ``default_is_none=False``: default ids are returned too (a
        state that was given positions would continue from those instead)."""
        if position_ids is None or (not self.attn.uses_rope
                                    and type(self.attn).positions_refusal is not None):
            return None  # positions= would change nothing the mechanism computes
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        ids = position_ids.to(hidden_states.device)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if tuple(ids.shape) not in ((length,), (batch, length)):
            raise ValueError(f"{who}: position_ids of shape {tuple(position_ids.shape)} do not "
                             f"match the {batch} x {length} tokens")
        if default_is_none and _default_positions(ids, past, length):
            return None
        refusal = type(self.attn).positions_refusal
        if refusal is not None:
            raise ValueError(f"{self.model_name}: {who}: position_ids other than "
                             f"{past}..{past + length - 1} (left padding: Hugging Face counts "
                             "each row's positions from its first real token) need per-row "
                             f"positions, which {self.attn.name} refuses: {refusal}")
        return ids

    def _cached(self, hidden_states: Tensor, cache: Any, attention_mask: Tensor | None,
                position_ids: Tensor | None, who: str) -> Tensor:
        """The forward with a transformers cache: only the new tokens go through the
        mechanism, with the attnlab state this layer keeps in ``cache``."""
        meta = self.attn.mechanism
        if meta is not None and not meta.decode:
            raise ValueError(f"{self.model_name}: {self.attn.name} cannot decode with a state "
                             "(its registry entry has decode=False), so a cache cannot hold "
                             "it: call the model and generate with use_cache=False (each step "
                             "then recomputes the whole sequence)")
        if not self.causal:
            raise ValueError(f"{self.model_name}: {who} is bidirectional; a cache serves "
                             "causal decoding only: call it with use_cache=False")
        slot = cache_slot(cache, self.layer_idx, f"{self.model_name}: {who}")
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        past = slot.get_seq_length()
        if self.window is not None and past + length > self.window:
            raise ValueError(f"{self.model_name}: {who}: the pretrained layer attends within a "
                             "sliding window of "
                             f"{self.window} keys, which attnlab modules do not implement: "
                             f"exact up to {self.window} tokens, got {past} cached + {length} "
                             f"new = {past + length}")
        # a state given per-row positions before continues from them when no positions come,
        # so default-looking ids must then be passed as they are
        given_before = slot.state is not None and slot.state.get("last_positions") is not None
        positions = self._positions(position_ids, hidden_states, past, who,
                                    default_is_none=not given_before)
        if slot.state is not None and slot.state.batch_size != batch:
            raise ValueError(f"{who}: the cache holds a state of {slot.state.batch_size} "
                             f"sequences, the call has {batch}")
        keep = _key_padding(attention_mask, batch, length, True, self.window, who, past=past,
                            cached=slot.padding)
        if slot.state is None:
            slot.state = self.attn.new_state(batch)
            slot.is_initialized = True
        out = self.attn(hidden_states, mask=None if keep is None else keep[:, past:],
                        state=slot.state, positions=positions)
        slot.padding = keep
        return out


_FEW_POSITIONS = 256  # up to this many ids, compared on the host (one copy, no tensor ops)


def _default_positions(ids: Tensor, past: int, length: int) -> bool:
    """Whether the position ids ``ids`` ((L,) or (B, L)) are past .. past + L - 1 in every
    row. A decoding step's few ids are read to the host in one copy (a step paid ~15 us per
    layer for the tensor comparison's allocations and ops); a long prompt's are compared as
    tensors."""
    if ids.numel() <= _FEW_POSITIONS:
        expected = list(range(past, past + length))
        values = ids.tolist()
        return all(row == expected for row in (values if ids.dim() == 2 else [values]))
    return bool((ids == torch.arange(past, past + length, device=ids.device)).all())


def _key_padding(attention_mask: Tensor | None, batch: int, length: int, causal: bool,
                 window: int | None, who: str, *, past: int = 0,
                 cached: Tensor | None = None) -> Tensor | None:
    """The (B, past + L) key padding mask (True = real token) a transformers attention mask
    holds, or None when every token is real; a mask that is not padding + the causal rule (+
    the window) is refused. ``past``: tokens already in the cache (the keys are those and the
    L new tokens, the queries the new ones); ``cached``: their padding, (B, past), None when
    all are real: a mask that pads them otherwise is refused."""
    total = past + length
    if attention_mask is None:
        if cached is not None and not bool(cached.all()):
            raise ValueError(f"{who}: the cache holds padded tokens but no attention mask was "
                             "passed: pass the mask of the cached and the new tokens")
        return None
    mask = attention_mask
    if mask.dim() == 2:  # flash-attention style: the padding itself
        keep = mask.bool() if mask.dtype != torch.bool else mask
    elif mask.dim() == 4 and mask.shape[-2:] == (length, total) and mask.shape[1] == 1:
        visible = mask[:, 0] if mask.dtype == torch.bool else \
            mask[:, 0] > torch.finfo(mask.dtype).min / 2
        visible = visible.expand(batch, length, total)
        if causal:  # a token is real when it sees itself
            keep = visible[:, :, past:].diagonal(dim1=-2, dim2=-1)
            if past:
                before = cached if cached is not None else \
                    torch.ones(batch, past, dtype=torch.bool, device=mask.device)
                keep = torch.cat((before.to(mask.device), keep), dim=1)
        else:
            keep = visible.any(-2)
        expected = keep[:, None, :].expand(batch, length, total)
        if causal and (length > 1 or (window is not None and total > window)):
            # query i is token past + i (one query sees every key, of a window it fits)
            rule = torch.ones(length, total, dtype=torch.bool, device=mask.device).tril(past)
            if window is not None:
                rule = rule.triu(past - (window - 1))
            expected = rule & expected
        rows = expected.any(-1, keepdim=True)  # rows that see no key may hold anything
        if not bool(((visible == expected) | ~rows).all()):
            cache_note = f" or a padding of the {past} cached tokens other than theirs" \
                if past else ""
            raise ValueError(f"{who}: the attention mask is not key padding plus the "
                             f"{'causal' if causal else 'bidirectional'} rule (a custom 4-D "
                             f"mask, e.g. packed sequences{cache_note}): not reproduced")
    else:
        expect = f"(B, L) or (B, 1, L, L) with L = {length}" if not past else \
            f"(B, {total}) or (B, 1, {length}, {total}): {past} cached + {length} new tokens"
        raise ValueError(f"{who}: attention mask of shape {tuple(mask.shape)} not understood "
                         f"(expected {expect})")
    if tuple(keep.shape) != (batch, total):
        raise ValueError(f"{who}: attention mask of shape {tuple(mask.shape)} does not match "
                         f"the batch ({batch}, {total})")
    if past and mask.dim() == 2:
        before = cached if cached is not None else \
            torch.ones(batch, past, dtype=torch.bool, device=keep.device)
        if not torch.equal(keep[:, :past], before.to(keep.device)):
            raise ValueError(f"{who}: the attention mask pads the {past} cached tokens "
                             "otherwise than when they were fed")
    return None if bool(keep.all()) else keep


# -------------------------------------------------------------------------- building
def refusal(mechanism: str, *, causal: bool, rope: bool, gqa: bool) -> str | None:
    """Why ``mechanism`` cannot run a pretrained layer with these properties, judged from its
    registry entry (None: nothing there forbids it; building may still refuse)."""
    meta = info(mechanism)
    if causal and not meta.causal:
        return f"{mechanism} is bidirectional only: it cannot run a causal model"
    if not causal and not meta.bidirectional:
        return f"{mechanism} is causal only: it cannot run a bidirectional model"
    if mechanism in LAYOUT_REASONS:
        return f"{mechanism} cannot be initialised from softmax weights: " \
               f"{LAYOUT_REASONS[mechanism]}"
    if "seq" not in meta.domains:
        return f"{mechanism} works on {'/'.join(meta.domains)} inputs, not token sequences"
    if rope and "rope" in meta.unsupported:
        return f"{mechanism} has no RoPE option: the model's rotary positions would be lost"
    if gqa and "kv_heads" in meta.unsupported:
        return f"{mechanism} has no kv_heads option: the model's grouped key/value heads (GQA) " \
               "do not fit"
    return None


def _build(layer: _Pretrained, mechanism: str, kwargs: dict[str, Any],
           architecture: str, keep_teacher: bool, model: str | None = None
           ) -> ConvertedAttention:
    why = refusal(mechanism, causal=layer.causal, rope=layer.rope_base is not None,
                  gqa=layer.kv_heads != layer.heads)
    if why is not None:
        raise ValueError(why)
    has_bias = any(b is not None for _, b in (layer.q, layer.k, layer.v, layer.o))
    args: dict[str, Any] = dict(dim=layer.dim, heads=layer.heads, head_dim=layer.head_dim,
                                causal=layer.causal, bias=has_bias, dropout=layer.dropout)
    if layer.kv_heads != layer.heads:
        args["kv_heads"] = layer.kv_heads
    if layer.rope_base is not None:
        args.update(rope=True, rope_base=layer.rope_base)
    weight = layer.q[0]
    with torch.device(weight.device):
        attn = build(mechanism, **args, **kwargs)
    attn = attn.to(dtype=weight.dtype)
    if layer.rope_base is not None:  # Hugging Face's RoPE: float32 frequencies and angles
        assert layer.rope_frequencies is not None
        attn.rotary = PretrainedRotary(attn.shape.qk_dim, layer.rope_base,
                                       layer.rope_frequencies).to(weight.device)
    pretrained = _load_projections(attn, layer, mechanism)
    attn.train(layer.original.training)
    return ConvertedAttention(attn, architecture=architecture, layer_idx=layer.layer_idx,
                              window=layer.window, pretrained=pretrained,
                              teacher=layer.original if keep_teacher else None,
                              teacher_parts=layer.originals_also if keep_teacher else None,
                              model=model)


def _load_projections(attn: Attention, layer: _Pretrained, mechanism: str
                      ) -> tuple[str, ...]:
    """Put the pretrained q, k, v, o into ``attn`` (new Linear layers with the pretrained
    bias layout); returns their parameter names in ``attn``."""
    qkv = attn.qkv
    maps = {name: getattr(qkv, name, None) for name in ("q", "k", "v")}
    reason = PROJECTION_REASONS.get(type(qkv).__name__)
    if reason is None and not all(isinstance(m, nn.Linear) for m in maps.values()):
        reason = f"its projection {type(qkv).__name__} has no plain q, k, v linear maps"
    if reason is None and not isinstance(attn.o_proj, nn.Linear):
        reason = "it has no output projection of its own (it mixes or projects the heads " \
                 "itself), so the pretrained output projection has no place"
    if reason is None:
        for name, (w, _) in (("q", layer.q), ("k", layer.k), ("v", layer.v), ("o", layer.o)):
            target = attn.o_proj if name == "o" else maps[name]
            assert isinstance(target, nn.Linear)
            if tuple(target.weight.shape) != tuple(w.shape):
                reason = (f"its {name} projection is {tuple(target.weight.shape)}, the "
                          f"pretrained one {tuple(w.shape)} (out, in)")
                break
    if reason is not None:
        raise ValueError(f"{mechanism} cannot be initialised from softmax weights: {reason}")
    names = []
    for name, (w, b) in (("q", layer.q), ("k", layer.k), ("v", layer.v), ("o", layer.o)):
        if isinstance(w, nn.Parameter) and (b is None or isinstance(b, nn.Parameter)):
            # the pretrained Linear's own parameters: no copy, and the teacher module keeps
            # using them (it follows the converted model's .to() and sees its updates)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
            lin.weight = w
            if b is not None:
                lin.bias = b
        else:  # a transposed or split layout (GPT-2's Conv1D): a copy
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device,
                            dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    assert lin.bias is not None
                    lin.bias.copy_(b)
        if name == "o":
            attn.o_proj = lin
            prefix = "o_proj"
        else:
            setattr(qkv, name, lin)
            prefix = f"qkv.{name}"
        names += [f"{prefix}.weight"] + ([f"{prefix}.bias"] if b is not None else [])
    return tuple(names)


def unmapped(kind: object) -> str:
    """Why a model of transformers model type ``kind`` cannot be converted (one that is not in
    ``ARCHITECTURES``)."""
    known = ", ".join(f"{a.name} ({t})" for t, a in ARCHITECTURES.items())
    return (f"attnlab has no mapping of model type {kind!r}'s attention modules onto its own "
            f"(where q, k, v, o, the positions and the masks live); it converts {known}")


def _architecture(model: nn.Module, mechanism: str) -> Architecture:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"{_who(model, mechanism)}: {unmapped(kind)}")
    return ARCHITECTURES[kind]


def convert(model: nn.Module, mechanism: str, *, keep_teacher: bool = True,
            distill: Any = None, distill_options: dict[str, Any] | None = None,
            **kwargs: Any) -> nn.Module:
    """Replace every self-attention module of the transformers ``model`` with an attnlab
    module of ``mechanism`` (in place; returns the model).

    The pretrained q, k, v and output projections (weights, biases, GQA layout) go into the
    new modules; RoPE (base, rotate-half pairing, float32 angles), causal or bidirectional
    masking, padding and the GPT-2 residual dropout are reproduced; the mechanism's own
    parameters are initialised by its constructor (``new_parameters(model)`` lists them).
    ``kwargs`` go to the mechanism (``attnlab info NAME``), except what the model sets
    (``SET_BY_MODEL``). ``keep_teacher``: keep each replaced module reachable as
    ``teacher(module)`` (for attention transfer; it shares the pretrained Linear parameters,
    so it costs no weight memory except for GPT-2, whose Conv1D weights are copied: False
    frees them).

    ``distill``: batches of text (token tensors or tokenizer outputs) to train the new
    parameters on right after conversion by attention transfer
    (``attnlab.integrations.distill.attention_transfer(model, distill, **distill_options)``;
    call that function yourself to get its log). The conversion is atomic; the transfer runs
    after it, so a transfer that fails leaves the model converted.

    The cache: ``config.use_cache`` becomes False (a plain forward builds no state);
    ``generation_config.use_cache`` stays as the model had it when the mechanism can decode
    (registry ``decode=True``), so ``generate`` feeds each layer only the new token with the
    layer's attnlab state kept in transformers' ``DynamicCache``; a mechanism that cannot
    decode sets it to False too and refuses a cache (module docstring, "The cache").

    ValueError, naming the model class and the mechanism, for: an architecture attnlab does
    not map (or a feature of it that it does not reproduce: RoPE scaling, cross-attention,
    relative positions), a mechanism that cannot hold softmax weights (why), a mechanism
    whose masking mode is not the model's (a bidirectional-only one in a causal model), and
    a model already converted. Nothing of the model changes when conversion fails.
    """
    from attnlab.integrations.hf import require_transformers  # (hf.py may import this module)

    require_transformers()
    if not isinstance(mechanism, str) or mechanism not in available():
        raise ValueError(f"{_who(model, str(mechanism))}: unknown mechanism {mechanism!r}; "
                         f"known: {', '.join(available())}")
    who = _who(model, mechanism)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{who}: expected a transformers model (nn.Module)")
    done = converted_modules(model)
    if done:
        raise ValueError(f"{who}: the model is already converted (to "
                         f"{done[0][1].attn.name}); convert the original model instead")
    if distill is not None and not keep_teacher:
        raise ValueError(f"{who}: distill= trains each layer to mimic the replaced one, which "
                         "keep_teacher=False drops")
    if distill is None and distill_options:
        raise ValueError(f"{who}: distill_options without distill= (the batches to train on)")
    fixed = sorted(set(kwargs) & set(SET_BY_MODEL))
    if fixed:
        raise ValueError(f"{who}: {', '.join(fixed)} come from the pretrained model and "
                         "cannot be passed")
    arch = _architecture(model, mechanism)
    try:
        layers = arch.layers(model)
        if not layers:
            raise ValueError("no attention module of the expected layout was found")
        built = [_build(layer, mechanism, kwargs, arch.name, keep_teacher, who)
                 for layer in layers]
    except ValueError as err:
        raise ValueError(f"{who}: {err}") from None
    # everything is built: put it in place (setattr on the parents cannot fail halfway)
    for layer, module in zip(layers, built, strict=True):
        _put(model, layer.path, module)
        for path, part in layer.also.items():
            _put(model, path, part)
    # the cache rule (module docstring): a plain forward builds no state; generate keeps
    # the model's own use_cache when the mechanism can decode with a state
    config: Any = model.config
    config.use_cache = False
    generation: Any = getattr(model, "generation_config", None)
    if generation is not None and not info(mechanism).decode:
        generation.use_cache = False  # generate() reads its own use_cache
    if distill is not None:
        from attnlab.integrations.distill import attention_transfer  # (it imports this module)

        attention_transfer(model, distill, **(distill_options or {}))
    return model


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def extra_loss(model: nn.Module) -> Tensor:
    """The sum of the converted modules' ``extra_loss()`` of the last forward (MoH load
    balancing, Hedgehog and Sparsifiner distillation, ...): add it to the task loss."""
    found = converted_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no converted attention (run convert "
                         "first)")
    losses = [m.attn.extra_loss() for _, m in found]
    return torch.stack([loss.float() for loss in losses]).sum()


def converted_modules(model: nn.Module) -> list[tuple[str, ConvertedAttention]]:
    """The converted attention modules of ``model``, with their paths, in order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ConvertedAttention)]


def _split_parameters(model: nn.Module, new: bool) -> Iterator[tuple[str, nn.Parameter]]:
    found = converted_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no converted attention (run convert "
                         "first)")
    for path, module in found:
        prefix = f"{path}.attn." if path else "attn."
        for name, param in module.attn.named_parameters():
            if ".lora_" in name:  # a peft adapter (finetune(..., lora=r)): neither kind
                continue
            if (name.replace(".base_layer.", ".") in module.pretrained) != new:
                yield prefix + name, param


def new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The mechanism's own parameters in a converted model (feature maps, gates, ...), by
    name: what attention transfer trains. Empty for a mechanism that adds none (softmax)."""
    return dict(_split_parameters(model, new=True))


def pretrained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The converted modules' parameters that hold the pretrained q, k, v, o projections."""
    return dict(_split_parameters(model, new=False))


def teacher(module: nn.Module) -> nn.Module:
    """The Hugging Face attention module a ``ConvertedAttention`` replaced (kept unless
    ``convert(..., keep_teacher=False)``); ValueError otherwise."""
    if not isinstance(module, ConvertedAttention):
        raise ValueError(f"{type(module).__name__} is not a converted attention module")
    if module.teacher is None:
        raise ValueError("the teacher was not kept (convert(..., keep_teacher=False))")
    return module.teacher
