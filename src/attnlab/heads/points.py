"""Hook points beyond attention: the residual stream, attention and MLP outputs, the final
norm, on attnlab models and on unmodified Hugging Face models (plain forward hooks on their
own modules; nothing is reimplemented).

Names follow TransformerLens (``i``: the block, in model order)::

    embed                 the residual entering block 0 (token (+ position) embeddings)
    blocks.{i}.resid_pre  the residual entering block i (a forward pre-hook on the block)
    blocks.{i}.attn_out   what the attention sublayer adds to the residual
    blocks.{i}.attn_z     the input of the attention's output projection, per head (B, L, H, D)
    blocks.{i}.mlp_out    what the MLP sublayer adds to the residual (absent in attention-only
                          blocks, where resid_post = resid_pre + attn_out)
    blocks.{i}.resid_post the residual leaving block i (its output)
    final_norm            the output of the final norm (what the unembedding reads)
    L{j}.q|k|v|weights|heads  the head-level points of ``heads.sites`` (where they exist)

:func:`hook_points` lists a model's names with what each means on that architecture (e.g.
BERT is post-norm: ``attn_out`` is the attention's dense output before its residual add and
LayerNorm). :func:`run_with_cache` records named points on the model's device, under a memory
bound; :func:`edit_points` replaces them for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.heads.metrics import Inputs, run_model
from attnlab.heads.sites import POINTS, sites

__all__ = ["ActivationCache", "BlockParts", "CacheFull", "Layout", "OutProjection",
           "edit_points", "hook_points", "layout", "out_projection", "run_with_cache"]

Positions = int | slice | Sequence[int] | None
Edit = Callable[[Tensor], Tensor | None]

# the attribute names of the parts of a Hugging Face layer, in the order they are tried
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f",
                    "final_norm")
OUT_PROJECTION_NAMES = ("o_proj", "c_proj", "out_proj", "dense", "out_lin", "o", "Wo")
MLP_OUT_NAMES = ("dense_4h_to_h", "down_proj", "c_proj", "fc2")  # an MLP's last projection
# the norm a pre-norm layer applies to the residual before its MLP, and nothing else (a norm
# shared with the attention, GPT-J's ln_1, is not one); in sandwich layers the MLP's pre-norm
MLP_NORM_NAMES = ("post_attention_layernorm", "ln_2")
SANDWICH_MLP_NORM_NAMES = ("pre_feedforward_layernorm",)
HEAD_SEQ_DIM = {"q": 2, "k": 2, "v": 2, "weights": 2, "heads": 1}


# ------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class BlockParts:
    """One block (layer) of the residual stack: ``attn`` is the module whose output is
    ``attn_out``, ``mlp`` the one whose output is ``mlp_out`` (None in an attention-only
    block: attnlab's ``mlp_ratio=0``, which has no ``mlp_out`` point), ``attention`` the attention
    module itself (where the output projection lives), ``branches`` attnlab's extra residual
    branches (``before``/``after``, see ``models.blocks.residual_branches``), ``mlp_in`` the
    module whose input is the residual the MLP reads (its own norm: attnlab's ``norm2``,
    GPT-2's ``ln_2``, Llama's ``post_attention_layernorm``, Gemma 2's
    ``pre_feedforward_layernorm``; OLMo-2's MLP itself, which has no norm before it; None
    where there is no MLP or no norm of the MLP's own)."""

    index: int
    path: str
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module | None
    attention: nn.Module
    branches: Mapping[str, nn.Module] = field(default_factory=dict)
    mlp_in: nn.Module | None = None


@dataclass(frozen=True)
class Layout:
    """Where a model's residual stream lives: its blocks, final norm and unembedding.

    ``family`` is ``"attnlab"`` (attnlab ``Block`` stacks: ``TransformerLM``, ``Encoder``,
    ``ViT``), ``"pre-norm"`` (GPT-2, Llama, Mistral, Qwen2, Phi-3, ...), ``"sandwich"``
    (Gemma 2/3, OLMo-2: a norm on each sublayer's output, which ``attn_out``/``mlp_out`` then
    are) or ``"post-norm"`` (BERT, RoBERTa: ``attn_out``/``mlp_out`` are the dense outputs
    before the residual add and LayerNorm)."""

    family: str
    blocks_path: str
    blocks: tuple[BlockParts, ...]
    final_norm: nn.Module | None
    final_norm_path: str | None
    unembed: nn.Module | None

    @property
    def residual_sums(self) -> bool:
        """Whether ``resid_post = resid_pre + attn_out + mlp_out`` (+ attnlab branches)."""
        return self.family != "post-norm"


def _path_of(model: nn.Module, module: nn.Module, paths: dict[int, str] | None = None) -> str:
    """The name of ``module`` in ``model`` (``paths``: ``{id(module): name}``, to look up
    many)."""
    if paths is not None:
        return paths.get(id(module), "?")
    for name, m in model.named_modules():
        if m is module:
            return name
    return "?"


def _child(module: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def _children_names(module: nn.Module) -> str:
    return ", ".join(name for name, _ in module.named_children()) or "none"


def _attnlab_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    from attnlab.models.blocks import Block

    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) > 0
            and all(isinstance(b, Block) for b in m)]


def _hf_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{type(model).__name__}: no residual stack found: it has no "
                         "attnlab Block list and no config.num_hidden_layers (a Hugging Face "
                         "model's config) to find its layer list by")
    found = [(path, m) for path, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of "
                         f"config.num_hidden_layers={n} layers")
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__}: {len(found)} layer lists of {n} layers "
                         f"({', '.join(p for p, _ in found)}): an encoder-decoder or a model "
                         "with several stacks, which the residual hook points do not cover")
    return found[0]


def _hf_parts(model: nn.Module, path: str, i: int, block: nn.Module) -> tuple[str, BlockParts]:
    where = f"{type(model).__name__} layer {path} ({type(block).__name__}, children: " \
        f"{_children_names(block)})"
    attn = _child(block, ATTENTION_NAMES)
    if attn is None:
        raise ValueError(f"{where}: no attention submodule (looked for "
                         f"{', '.join(ATTENTION_NAMES)})")
    attention = attn[1]
    attn_dense = _child(getattr(attention, "output", nn.Identity()), ("dense",))
    mlp_dense = _child(getattr(block, "output", nn.Identity()), ("dense",))
    if attn_dense is not None and mlp_dense is not None:
        # BERT family: attention.output = LayerNorm(dense(z) + x), output = LN(dense(h) + x)
        return "post-norm", BlockParts(i, path, block, attn_dense[1], mlp_dense[1], attention)
    mlp = _child(block, MLP_NAMES)
    if mlp is not None and isinstance(getattr(block, "sa_layer_norm", None), nn.Module):
        # DistilBERT: sa_layer_norm(attention(x) + x), output_layer_norm(ffn(h) + h)
        return "post-norm", BlockParts(i, path, block, attention, mlp[1], attention)
    if mlp is None:
        raise ValueError(f"{where}: no MLP submodule (looked for {', '.join(MLP_NAMES)})")
    post_attn = getattr(block, "post_attention_layernorm", None)
    post_mlp = getattr(block, "post_feedforward_layernorm", None)
    if isinstance(post_attn, nn.Module) and isinstance(post_mlp, nn.Module):
        # Gemma 2/3, OLMo-2: x + norm(attn(...)), x + norm(mlp(...))
        pre_mlp = _child(block, SANDWICH_MLP_NORM_NAMES)
        return "sandwich", BlockParts(i, path, block, post_attn, post_mlp, attention,
                                      mlp_in=mlp[1] if pre_mlp is None else pre_mlp[1])
    attn_part, mlp_part = attention, mlp[1]
    if _takes_residual(attention) or _takes_residual(mlp_part):
        # BLOOM: the modules add the residual themselves; what they add is their last
        # projection's output
        inner_attn = _child(attention, OUT_PROJECTION_NAMES)
        inner_mlp = _child(mlp_part, MLP_OUT_NAMES)
        if inner_attn is None or inner_mlp is None:
            raise ValueError(f"{where}: its attention / MLP add the residual inside, and their "
                             f"last projections were not found (looked for "
                             f"{', '.join(OUT_PROJECTION_NAMES)} / {', '.join(MLP_OUT_NAMES)})")
        attn_part, mlp_part = inner_attn[1], inner_mlp[1]
    mlp_norm = _child(block, MLP_NORM_NAMES)
    return "pre-norm", BlockParts(i, path, block, attn_part, mlp_part, attention,
                                  mlp_in=None if mlp_norm is None else mlp_norm[1])


def _takes_residual(module: nn.Module) -> bool:
    try:
        return "residual" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _mlp_norm(block: nn.Module) -> nn.Module | None:
    """An attnlab block's norm before its MLP (``norm2``), None in an attention-only block."""
    norm = getattr(block, "norm2", None)
    return norm if isinstance(norm, nn.Module) and _optional_mlp(block) is not None else None


def _optional_mlp(block: nn.Module) -> nn.Module | None:
    """An attnlab block's MLP, or None for an attention-only block (``mlp_ratio=0``: its
    ``mlp`` and ``norm2`` are None and the block is x + attn(norm(x)))."""
    mlp = getattr(block, "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None


def layout(model: nn.Module) -> Layout:
    """The residual stack of ``model``: attnlab ``Block`` lists, or the Hugging Face layer
    list (the ``nn.ModuleList`` of ``config.num_hidden_layers`` layers) with each layer's
    attention and MLP found by their well-known attribute names; the final norm is an
    attribute of the module holding the list (``norm``, ``ln_f``, ``final_layer_norm``, ...;
    None for BERT, whose layers end in their own LayerNorm); the unembedding is
    ``get_output_embeddings()`` (Hugging Face) or ``head`` (attnlab ``TransformerLM``).
    ValueError naming what was not found."""
    stacks = _attnlab_blocks(model)
    if len(stacks) > 1:
        raise ValueError(f"{type(model).__name__}: {len(stacks)} attnlab block lists "
                         f"({', '.join(p for p, _ in stacks)}); the residual hook points "
                         "cover models with one")
    if stacks:
        from attnlab.models.blocks import BRANCH_PLACES

        path, blocks = stacks[0]
        parts = tuple(BlockParts(i, f"{path}.{i}", b, b.get_submodule("attn"),
                                 _optional_mlp(b), b.get_submodule("attn"),
                                 {p: b.get_submodule(p) for p in BRANCH_PLACES
                                  if isinstance(getattr(b, p, None), nn.Module)},
                                 _mlp_norm(b))
                      for i, b in enumerate(blocks))
        family = "attnlab"
    else:
        path, blocks = _hf_blocks(model)
        found = [_hf_parts(model, f"{path}.{i}", i, b) for i, b in enumerate(blocks)]
        families = {f for f, _ in found}
        if len(families) > 1:
            raise ValueError(f"{type(model).__name__}: its layers differ in kind "
                             f"({', '.join(sorted(families))})")
        family, parts = families.pop(), tuple(p for _, p in found)
    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    norm = _child(owner, FINAL_NORM_NAMES)
    norm_path = None if norm is None else _path_of(model, norm[1])
    unembed: nn.Module | None = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        got = getter()
        unembed = got if isinstance(got, nn.Module) else None
    elif family == "attnlab" and isinstance(getattr(model, "head", None), nn.Linear) \
            and hasattr(model, "embed"):
        unembed = model.get_submodule("head")
    return Layout(family, path, parts, None if norm is None else norm[1], norm_path, unembed)


# ------------------------------------------------------------------- output projection
@dataclass(frozen=True)
class OutProjection:
    """An attention layer's output projection read per head: ``module`` (whose input is
    ``attn_z``), ``weight`` (dim, H, D): head h's slice maps its D values to the residual,
    ``bias`` (dim,) or None, ``heads`` and ``head_dim``."""

    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    heads: int
    head_dim: int


def _hf_heads(attention: nn.Module, model: nn.Module) -> int:
    try:
        from attnlab.integrations.hf import head_counts

        return head_counts(attention)[0]
    except (AttributeError, TypeError, ValueError):
        pass
    inner = getattr(attention, "self", None)  # BERT: BertAttention.self
    for module in (inner, attention):
        for name in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
            value = getattr(module, name, None)
            if isinstance(value, int) and value > 0:
                return value
    n = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ValueError(f"{type(attention).__name__}: cannot tell its number of heads")


def out_projection(model: nn.Module, block: int, *, where: Layout | None = None
                   ) -> OutProjection:
    """The output projection of block ``block``'s attention, per head.

    attnlab: the mechanism's ``o_proj`` (an ``nn.Linear``), which every mechanism reaches
    through the base class's ``_finish`` (``hook_heads`` -> gate -> ``head_scale`` ->
    ``o_proj`` -> ``post`` -> dropout); refused for a mechanism whose output is not a sum
    over heads of that projection (no linear ``o_proj``, an overridden ``post``, an output
    norm, or dropout while training). Hugging Face: ``o_proj`` (Llama family), ``c_proj``
    (GPT-2's ``Conv1D``), ``dense`` (BERT's ``attention.output.dense``), ``out_proj``."""
    from attnlab.mechanisms.base import Attention

    lay = where or layout(model)
    if not 0 <= block < len(lay.blocks):
        raise ValueError(f"block {block} out of range: the model has {len(lay.blocks)} blocks "
                         f"(0..{len(lay.blocks) - 1})")
    parts = lay.blocks[block]
    attention = parts.attention
    if isinstance(attention, Attention):
        why = None
        if not isinstance(attention.o_proj, nn.Linear):
            why = "it has no linear output projection (output_projection=False)"
        elif type(attention).post is not Attention.post or \
                not isinstance(attention.out_norm, nn.Identity):
            why = "a module or norm acts on the projected output (post / output_norm)"
        elif attention.training and attention.drop.p > 0:
            why = "dropout is on (call model.eval())"
        if why:
            raise ValueError(f"{attention.name} (block {block}): its output is not a per-head "
                             f"sum through an output projection: {why}")
        proj: nn.Module = attention.o_proj
        heads = attention.heads
    elif lay.family == "post-norm" and parts.attn is not attention:
        proj, heads = parts.attn, _hf_heads(attention, model)  # BERT: attention.output.dense
    else:
        found = _child(attention, OUT_PROJECTION_NAMES)
        if found is None:
            raise ValueError(f"{type(attention).__name__} (block {block}): no output "
                             f"projection (looked for {', '.join(OUT_PROJECTION_NAMES)}; "
                             f"children: {_children_names(attention)})")
        proj, heads = found[1], _hf_heads(attention, model)
    weight = getattr(proj, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(proj).__name__} (block {block}): not a linear projection")
    if isinstance(proj, nn.Linear):
        w = weight  # (out, in)
    elif type(proj).__name__ == "Conv1D":  # transformers' GPT-2 projection: x @ W + b
        w = weight.t()
    else:
        raise ValueError(f"{type(proj).__name__} (block {block}): the output projection is "
                         "neither nn.Linear nor transformers' Conv1D")
    if w.shape[1] % heads:
        raise ValueError(f"block {block}: the output projection reads {w.shape[1]} features, "
                         f"not a multiple of {heads} heads")
    d = w.shape[1] // heads
    bias = getattr(proj, "bias", None)
    return OutProjection(proj, w.reshape(w.shape[0], heads, d),
                         bias if isinstance(bias, Tensor) else None, heads, d)


# ------------------------------------------------------------------------ hook points
@dataclass(frozen=True)
class _Point:
    name: str
    module: nn.Module
    kind: str  # "pre" (the module's first input), "out" (its output), "z" (o_proj input)
    seq_dim: int
    description: str
    heads: int = 0  # "z": split the last axis into (heads, D)


def _describe(lay: Layout, model: nn.Module, p: BlockParts, paths: dict[int, str]
              ) -> dict[str, str]:
    path = lambda m: f"{_path_of(model, m, paths)} ({type(m).__name__})"  # noqa: E731
    if lay.family == "attnlab":
        attn = f"output of {path(p.attn)} (after its output projection and dropout)"
        if p.branches:
            attn += "; the block's residual branches (" + ", ".join(p.branches) + \
                f") are not in it: they are blocks.{p.index}.<place>_out"
        mlp = "" if p.mlp is None else f"output of {path(p.mlp)}"
    elif lay.family == "post-norm":
        attn = f"output of {path(p.attn)}: the attention's projection, before the residual " \
            "add and the LayerNorm after it (post-norm: resid_post is not a sum)"
        mlp = f"output of {path(p.mlp)}: the MLP's last projection, before the residual add " \
            "and the LayerNorm"
    elif lay.family == "sandwich":
        attn = f"output of {path(p.attn)}: the normed attention output added to the residual"
        mlp = f"output of {path(p.mlp)}: the normed MLP output added to the residual"
    else:
        attn = f"output of {path(p.attn)} (incl. its output projection's bias), added to the " \
            "residual"
        mlp = f"output of {path(p.mlp)}, added to the residual"
        if p.attn is not p.attention:
            attn += " (the attention module adds the residual itself)"
        factor = getattr(getattr(model, "config", None), "residual_multiplier", None)
        if isinstance(factor, int | float) and factor != 1:
            scaled = f" (the model multiplies it by residual_multiplier={factor} first)"
            attn, mlp = attn + scaled, mlp + scaled
    return {"resid_pre": f"input of {path(p.block)}", "attn_out": attn, "mlp_out": mlp,
            "resid_post": f"output of {path(p.block)}"
                          + ("" if lay.residual_sums else " (after its last LayerNorm)")}


def _points(model: nn.Module) -> dict[str, _Point]:
    lay = layout(model)
    paths = {id(m): name for name, m in model.named_modules()}
    out: dict[str, _Point] = {}
    first = lay.blocks[0].block
    out["embed"] = _Point("embed", first, "pre", 1,
                          "the residual entering block 0 (input of "
                          f"{_path_of(model, first, paths)}): the embeddings as the first "
                          "block receives them")
    for p in lay.blocks:
        text = _describe(lay, model, p, paths)
        b = f"blocks.{p.index}"
        out[f"{b}.resid_pre"] = _Point(f"{b}.resid_pre", p.block, "pre", 1, text["resid_pre"])
        branch_points = {place: _Point(f"{b}.{place}_out", branch, "out", 1,
                                       f"output of the residual branch "
                                       f"{_path_of(model, branch, paths)}, added {place} the "
                                       "attention")
                         for place, branch in p.branches.items()}
        if "before" in branch_points:
            out[f"{b}.before_out"] = branch_points["before"]
        out[f"{b}.attn_out"] = _Point(f"{b}.attn_out", p.attn, "out", 1, text["attn_out"])
        try:
            proj = out_projection(model, p.index, where=lay)
        except ValueError:
            proj = None
        if proj is not None:
            out[f"{b}.attn_z"] = _Point(
                f"{b}.attn_z", proj.module, "z", 1,
                f"input of {_path_of(model, proj.module, paths)} split per head (B, L, "
                f"{proj.heads}, {proj.head_dim}): each head's share of attn_out", proj.heads)
        if "after" in branch_points:
            out[f"{b}.after_out"] = branch_points["after"]
        if p.mlp is not None:  # attention-only blocks have no MLP: resid_post = pre + attn
            out[f"{b}.mlp_out"] = _Point(f"{b}.mlp_out", p.mlp, "out", 1, text["mlp_out"])
        out[f"{b}.resid_post"] = _Point(f"{b}.resid_post", p.block, "out", 1,
                                        text["resid_post"])
    if lay.final_norm is not None:
        out["final_norm"] = _Point("final_norm", lay.final_norm, "out", 1,
                                   f"output of the final norm, {lay.final_norm_path} "
                                   f"({type(lay.final_norm).__name__}): what the unembedding "
                                   "reads")
    try:
        model_sites = sites(model)
    except ValueError:
        model_sites = []
    for s in model_sites:
        for point in POINTS:
            name = f"L{s.layer}.{point}"
            out[name] = _Point(name, s.hook(point), "out", HEAD_SEQ_DIM[point],
                               f"hook_{point} of attention layer {s.layer} ({s})")
    return out


def hook_points(model: nn.Module) -> dict[str, str]:
    """Every hook point name of ``model`` -> what it is on this architecture, in model
    order: ``embed``, per block ``blocks.{i}.resid_pre``, ``attn_out``, ``attn_z`` (where the
    output projection is per head), ``mlp_out``, ``resid_post`` (attnlab blocks with residual
    branches also ``blocks.{i}.before_out``/``after_out``), ``final_norm`` (where the model
    has one), and the head-level ``L{j}.q|k|v|weights|heads`` where ``heads.sites`` reaches
    the attention (attnlab models; Hugging Face models prepared with ``use_attnlab``)."""
    return {name: p.description for name, p in _points(model).items()}


def _resolve(points: Mapping[str, _Point], names: str | Sequence[str]) -> list[_Point]:
    patterns = [names] if isinstance(names, str) else list(names)
    if not patterns:
        raise ValueError("no hook point named: pass '*' or names / patterns")
    chosen: dict[str, _Point] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"hook point names are strings, got {type(pattern).__name__}")
        hits = [n for n in points if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, list(points), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                "; hook_points(model) lists the names"
            raise ValueError(f"no hook point matches {pattern!r}{hint}")
        chosen.update((n, points[n]) for n in hits)
    order = list(points)
    return sorted(chosen.values(), key=lambda p: order.index(p.name))


def tensor_of(value: Any, what: str) -> Tensor:
    """The tensor a module gave: ``value`` itself or the first element of its tuple/list
    (transformers' modules return tuples); ValueError naming ``what`` otherwise."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise ValueError(f"{what}: the module gave {type(value).__name__}, not a tensor or a "
                     "tuple starting with one")


def with_tensor(value: Any, new: Tensor) -> Any:
    """``value`` (a tensor, or a tuple/list starting with one) with that tensor replaced."""
    if isinstance(value, Tensor):
        return new
    return type(value)([new, *value[1:]]) if isinstance(value, list) else (new, *value[1:])


def _pre_input(args: tuple, kwargs: dict, what: str) -> tuple[Tensor, bool]:
    """The hidden state a block is called with: its first positional argument, else the
    keyword ``hidden_states``; (tensor, whether it was positional)."""
    if args and isinstance(args[0], Tensor):
        return args[0], True
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, Tensor):
        return hidden, False
    raise ValueError(f"{what}: the block was called without a hidden-state tensor (first "
                     "positional argument or hidden_states=)")


def _z_view(t: Tensor, heads: int) -> Tensor:
    return t.unflatten(-1, (heads, t.shape[-1] // heads))


# --------------------------------------------------------------------------- the cache
class CacheFull(MemoryError):
    """Raised by :func:`run_with_cache` before it stores the point that would take the cache
    past ``max_bytes``: ``point`` (its name), ``point_bytes``, ``stored_bytes`` (held before
    it, never more than ``max_bytes``) and ``max_bytes``."""

    def __init__(self, point: str, shape: tuple[int, ...], point_bytes: int, stored_bytes: int,
                 stored_points: int, max_bytes: int) -> None:
        super().__init__(
            f"run_with_cache: storing {point} {shape} ({point_bytes:,} bytes) would take the "
            f"cache past max_bytes={max_bytes:,} ({stored_bytes:,} bytes in {stored_points} "
            "points so far): name fewer points, keep fewer positions= or raise max_bytes")
        self.point, self.point_bytes = point, point_bytes
        self.stored_bytes, self.max_bytes = stored_bytes, max_bytes


class ActivationCache:
    """What :func:`run_with_cache` recorded: ``cache["blocks.0.resid_post"]`` (a tensor on the
    model's device), ``cache.names()``, ``cache.nbytes`` (bytes held), ``name in cache``,
    ``cache.stack("resid_post")`` ((blocks, ...) of every ``blocks.{i}.resid_post`` held).
    ``positions`` is the selection the points were cut to (None: all)."""

    def __init__(self, max_bytes: int | None, positions: Positions = None) -> None:
        self.max_bytes = max_bytes
        self.positions = positions
        self._store: dict[str, Tensor] = {}
        self.nbytes = 0

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._store:
            close = difflib.get_close_matches(name, list(self._store), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f" (held: {', '.join(self._store) or 'nothing'})"
            raise KeyError(f"{name!r} is not in the cache{hint}")
        return self._store[name]

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def __len__(self) -> int:
        return len(self._store)

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def names(self) -> list[str]:
        """The names held, in the order they were recorded."""
        return list(self._store)

    def items(self) -> list[tuple[str, Tensor]]:
        return list(self._store.items())

    def stack(self, point: str) -> Tensor:
        """(blocks, ...): ``blocks.{i}.<point>`` of every block held, in block order."""
        found = sorted((int(n.split(".")[1]), t) for n, t in self._store.items()
                       if n.startswith("blocks.") and n.split(".", 2)[2] == point)
        if not found:
            raise KeyError(f"no blocks.<i>.{point} in the cache (held: "
                           f"{', '.join(self._store) or 'nothing'})")
        return torch.stack([t for _, t in found])

    def describe(self) -> str:
        """One line per name with its shape and dtype, and the total bytes."""
        lines = [f"{n:<22} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                 for n, t in self._store.items()]
        bound = "no bound" if self.max_bytes is None else f"max_bytes={self.max_bytes:,}"
        return "\n".join([*lines, f"{len(self._store)} points, {self.nbytes:,} bytes ({bound})"])

    def _add(self, name: str, tensor: Tensor, seq_dim: int, keep_graph: bool) -> None:
        if name in self._store:
            raise ValueError(f"hook point {name} ran twice in one run_with_cache call (a module "
                             "shared between layers, or a forward= that calls the model twice)")
        index = _position_index(self.positions, tensor, seq_dim, name)
        rows = tensor.shape[seq_dim] if index is None else int(index.numel())
        size = tensor.numel() // max(tensor.shape[seq_dim], 1) * rows * tensor.element_size()
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            raise CacheFull(name, tuple(tensor.shape), size, self.nbytes, len(self._store),
                            self.max_bytes)
        t = tensor if keep_graph else tensor.detach()
        # a copy: the model may change the tensor in place later (Falcon adds the attention
        # output into the MLP's), and a view would keep a larger buffer alive
        t = t.clone() if index is None else t.index_select(seq_dim, index)
        self._store[name] = t
        self.nbytes += size


def _position_index(positions: Positions, tensor: Tensor, seq_dim: int,
                    name: str) -> Tensor | None:
    if positions is None:
        return None
    if tensor.dim() <= seq_dim:
        raise ValueError(f"{name} {tuple(tensor.shape)} has no sequence axis {seq_dim} to "
                         "select positions from")
    length = tensor.shape[seq_dim]
    if isinstance(positions, slice):
        chosen = list(range(length))[positions]
    elif isinstance(positions, int):
        chosen = [positions]
    else:
        chosen = [int(p) for p in positions]
    for p in chosen:
        if not -length <= p < length:
            raise ValueError(f"position {p} out of range for {name}, whose sequence axis "
                             f"{seq_dim} has {length} positions")
    return torch.tensor([p % length for p in chosen], dtype=torch.long, device=tensor.device)


def run_with_cache(model: nn.Module, inputs: Inputs, names: str | Sequence[str] = "*", *,
                   positions: Positions = None, max_bytes: int | None = 1 << 30,
                   forward: Callable[[nn.Module, Inputs], Tensor] | None = None,
                   grad: bool = False) -> tuple[Tensor, ActivationCache]:
    """Run ``model`` on ``inputs`` and record the hook points matching ``names`` (``"*"``,
    or names / ``fnmatch`` patterns such as ``"blocks.*.resid_post"``, ``"L0.*"``).

    Returns (logits, cache): the logits of ``forward(model, inputs)`` (default
    ``heads.metrics.run_model``), the cache holding each point's tensor on the model's device.
    ``positions`` (an index, a slice or a list of indices) keeps only those sequence positions
    of every point (axis 1 of residual points (B, L, D), ``attn_z`` and ``L{j}.heads``
    (B, L, H, D); axis 2 of ``L{j}.q|k|v|weights`` (B, H, L, ...)); an int keeps the axis
    (length 1). In an ``Encoder`` / ``ViT`` whose blocks see (B, H, W, dim) grids, axis 1 of
    a residual point is the grid's row. Each point is stored as a copy (the model may change
    its own tensor in place later). ``max_bytes`` bounds the bytes held: the point that would
    exceed it raises :class:`CacheFull` (a ``MemoryError``) before it is stored (the forward
    stops there).
    ``grad=False`` runs under ``torch.no_grad()``; ``grad=True`` runs with autograd and keeps
    the cached tensors in the graph. A name matching no point, or a point that did not run in
    the forward, is a ValueError (suggesting close names)."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    chosen = _resolve(_points(model), names)
    cache = ActivationCache(max_bytes, positions)
    handles = []
    try:
        for p in chosen:
            if p.kind == "pre":
                def pre(_m: nn.Module, args: tuple, kwargs: dict, p: _Point = p) -> None:
                    cache._add(p.name, _pre_input(args, kwargs, p.name)[0], p.seq_dim, grad)
                handles.append(p.module.register_forward_pre_hook(pre, with_kwargs=True))
            elif p.kind == "z":
                def z(_m: nn.Module, args: tuple, p: _Point = p) -> None:
                    cache._add(p.name, _z_view(tensor_of(args, p.name), p.heads), p.seq_dim,
                               grad)
                handles.append(p.module.register_forward_pre_hook(z))
            else:
                def out(_m: nn.Module, _args: tuple, value: Any, p: _Point = p) -> None:
                    cache._add(p.name, tensor_of(value, p.name), p.seq_dim, grad)
                handles.append(p.module.register_forward_hook(out))
        with contextlib.nullcontext() if grad else torch.no_grad():
            logits = (forward or run_model)(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p.name for p in chosen if p.name not in cache]
    if missing:
        raise ValueError(f"hook points {', '.join(missing)} did not run in this forward (the "
                         "model computed them without calling the module they hook, or "
                         "forward= skipped them)")
    return logits, cache


# ---------------------------------------------------------------------------- editing
def _apply(edit: Edit, value: Tensor, name: str) -> Tensor:
    new = edit(value)
    if new is None:
        return value
    if not isinstance(new, Tensor):
        raise TypeError(f"the edit of {name} returned {type(new).__name__}, not a tensor or "
                        "None")
    if new.shape != value.shape:
        raise ValueError(f"the edit of {name} returned shape {tuple(new.shape)}, the point has "
                         f"{tuple(value.shape)}")
    return new


@contextlib.contextmanager
def edit_points(model: nn.Module, edits: Mapping[str, Edit]) -> Iterator[None]:
    """Inside the block, ``edits[name]`` receives the activation at hook point ``name`` and
    its return value (if not None; same shape) replaces it downstream. ``resid_pre`` and
    ``embed`` replace the block's input (a forward pre-hook); ``attn_z`` receives (B, L, H,
    D) and replaces the output projection's input; head-level names edit the existing hook
    points (``sites.forward_hooks`` semantics). Edits run before hooks already attached
    (``prepend``), so a ``run_with_cache`` around or inside the block records the edited
    values. Every hook is removed when the block ends, also on an exception."""
    points = _points(model)
    for name in edits:
        _resolve(points, [name])  # the ValueError with close names
        if name not in points:
            raise ValueError(f"edit_points takes exact names, got the pattern {name!r}")
    grouped: dict[tuple[int, str], list[tuple[_Point, Edit]]] = {}
    for p in (points[n] for n in points if n in edits):  # model order: embed before resid_pre
        grouped.setdefault((id(p.module), p.kind), []).append((p, edits[p.name]))
    handles = []
    try:
        for (_, kind), group in grouped.items():
            module = group[0][0].module
            if kind == "pre":
                def pre(_m: nn.Module, args: tuple, kwargs: dict,
                        group: list[tuple[_Point, Edit]] = group) -> tuple[tuple, dict]:
                    x, positional = _pre_input(args, kwargs, group[0][0].name)
                    for p, edit in group:
                        x = _apply(edit, x, p.name)
                    if positional:
                        return (x, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": x}
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True,
                                                                prepend=True))
            elif kind == "z":
                def z(_m: nn.Module, args: tuple,
                      group: list[tuple[_Point, Edit]] = group) -> tuple:
                    p, edit = group[0]
                    x = tensor_of(args, p.name)
                    new = _apply(edit, _z_view(x, p.heads), p.name)
                    return (new.flatten(-2), *args[1:])
                handles.append(module.register_forward_pre_hook(z, prepend=True))
            else:
                def out(_m: nn.Module, _args: tuple, value: Any,
                        group: list[tuple[_Point, Edit]] = group) -> Any:
                    x = tensor_of(value, group[0][0].name)
                    for p, edit in group:
                        x = _apply(edit, x, p.name)
                    return with_tensor(value, x)
                handles.append(module.register_forward_hook(out, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
