"""``attnlab convert hf``: any local transformers checkpoint (GPT-2, Llama, Qwen2, Mistral,
BERT) converted to another mechanism, distilled (attention transfer), fine-tuned (in full or
with LoRA), evaluated against the unconverted model and saved; ``attnlab convert load``
reads a saved one back.

Text (``--text FILE``, default the bundled char_lm corpus's English sentences): the file's
non-empty lines, the last tenth of them (at least one line) held out for the evaluation and
the rest for training; with the default corpus, the sentences of its training part train
and those of its test part are held out (``conversion.sentence_pool``). Causal models read
the lines joined by newlines, tokenised once and cut into consecutive windows of
``--length`` tokens (training windows in an order drawn from the seed, ``--batch-size`` a
batch; ``--eval`` held-out windows evenly spread over the held-out part, perplexity over
every next-token prediction in them). Encoders read one line per example (padded, truncated
to ``--length`` tokens): training batches of ``--batch-size`` lines in an order drawn from
the seed, ``--eval`` held-out lines evenly spread, compared by the cosine of their
mean-pooled embeddings to the unconverted model's and nearest-neighbour agreement
(``conversion.embedding_agreement``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from torch import Tensor, nn

console = Console()
DISTILL = ("none", "auto", "hedgehog", "lolcats")  # also attnlab convert minilm / lm / study
OBJECTIVES = ("none", "lm", "logits", "hidden")
HELD_OUT = 10  # --text: the last 1/HELD_OUT of the lines is held out

# Options of the same name, type, default and meaning in attnlab convert hf and convert
# minilm (--kw and --lr also in convert lm), kept here once; cli/convert.py applies them
# too (it imports this module; this module imports it only inside functions).
MECHANISM_OPTION = click.option(
    "--mechanism", required=True,
    help="A contestant (softmax, hedgehog, elu+1, identity, sigmoid, gated, lssa, "
         "neighborhood) or any registered mechanism.")
KW_OPTION = click.option("--kw", multiple=True,
                         help="Mechanism argument key=value (repeatable).")
DISTILL_OPTION = click.option(
    "--distill", type=click.Choice(DISTILL), default="none", show_default=True,
    help="Attention transfer of the new parameters (attention_transfer; auto: hedgehog where "
         "the weights give the output, else lolcats).")
STEPS_OPTION = click.option("--steps", type=click.IntRange(0), default=100,
                            show_default=True, help="Attention-transfer steps (with --distill).")
LR_OPTION = click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-2,
                         show_default=True, help="Attention-transfer learning rate.")
DEVICE_OPTION = click.option("--device", default="cpu", show_default=True,
                             help="cpu, cuda, cuda:1, ...")
_F = TypeVar("_F", bound=Callable[..., Any])


def conversion_options(command: _F) -> _F:
    """--mechanism, --kw, --distill, --steps and --lr on ``command``, in that order in its
    --help (as those decorators stacked in that order)."""
    for option in (LR_OPTION, STEPS_OPTION, DISTILL_OPTION, KW_OPTION, MECHANISM_OPTION):
        command = option(command)
    return command


# ----------------------------------------------------------------------------- text
def _lines(text: str | None) -> tuple[list[str], list[str], str]:
    """(training lines, held-out lines, description) of ``--text`` or the bundled corpus."""
    if text is None:
        from attnlab.heads.studies.conversion import sentence_pool

        return list(sentence_pool("train")), list(sentence_pool("test")), \
            "char_lm corpus sentences (bundled): training part / test part"
    raw = Path(text).read_bytes()
    try:
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise click.UsageError(f"--text {text}: not UTF-8 text ({err})") from None
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise click.UsageError(f"--text {text}: {len(lines)} non-empty line(s); at least 2 "
                               "are needed (the last tenth is held out)")
    held = max(1, len(lines) // HELD_OUT)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return lines[:-held], lines[-held:], \
        f"{text} (sha256 {digest}…): {len(lines) - held} training lines, last {held} held out"


def _windows(tokenizer: Any, lines: Sequence[str], length: int) -> Tensor:
    """The lines joined by newlines, tokenised (no special tokens) and cut into consecutive
    windows of ``length`` tokens: (N, length)."""
    import torch

    ids = tokenizer("\n".join(lines), add_special_tokens=False, verbose=False)["input_ids"]
    count = len(ids) // length
    return torch.tensor(ids[:count * length], dtype=torch.long).view(count, length)


def _spread(count: int, total: int) -> list[int]:
    """``count`` indices evenly spread over ``range(total)`` (all when fewer)."""
    if total <= count:
        return list(range(total))
    return [int(i * total / count) for i in range(count)]


def _order(total: int, seed: int) -> list[int]:
    import torch

    return torch.randperm(total, generator=torch.Generator().manual_seed(1000 + seed)).tolist()


def _data(tokenizer: Any, causal: bool, train: list[str], held: list[str], length: int,
          batch_size: int, count: int, seed: int) -> tuple[list[Any], Any]:
    """(training batches, held-out examples): token windows for a causal model, tokenised
    line batches and held-out lines for an encoder."""
    if causal:
        windows = _windows(tokenizer, train, length)
        if len(windows) < batch_size:
            raise click.UsageError(f"the training text gives {len(windows)} window(s) of "
                                   f"{length} tokens, fewer than one batch of {batch_size}: "
                                   "give more text or lower --length / --batch-size")
        shuffled = windows[_order(len(windows), seed)]
        batches = list(shuffled[:len(shuffled) // batch_size * batch_size].split(batch_size))
        test = _windows(tokenizer, held, length)
        if not len(test):
            raise click.UsageError(f"the held-out text gives no window of {length} tokens: "
                                   "give more text or lower --length")
        return batches, test[_spread(count, len(test))]
    if len(held) < 2:
        raise click.UsageError("nearest-neighbour agreement needs at least 2 held-out lines; "
                               "give more text")
    order = _order(len(train), seed)
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = [train[i] for i in order[start:start + batch_size]]
        batches.append(dict(tokenizer(chosen, padding=True, truncation=True,
                                      max_length=length, return_tensors="pt")))
    if not batches:
        raise click.UsageError(f"the training text has {len(train)} line(s), fewer than one "
                               f"batch of {batch_size}")
    return batches, [held[i] for i in _spread(count, len(held))]


def _on(batch: Any, device: str) -> Any:
    if hasattr(batch, "to"):  # a tensor
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------ evaluation
def perplexity(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """exp(mean next-token cross-entropy) of a causal transformers model over every
    prediction inside ``windows`` (N, L); eval mode (the model's mode is restored)."""
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for x in windows.split(batch_size):
                x = x.to(device)
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(),
                                               reduction="sum"))
                count += x[:, 1:].numel()
    finally:
        model.train(was)
    return math.exp(total / count)


def _embeddings(model: nn.Module, tokenizer: Any, lines: list[str], batch_size: int,
                length: int) -> Tensor:
    from attnlab.integrations.hf import sentence_embeddings

    was = model.training
    model.eval()
    try:
        return sentence_embeddings(model, tokenizer, lines, batch_size=batch_size,
                                   max_length=length)
    finally:
        model.train(was)


# ------------------------------------------------------------------------- checks
def _skeleton(config: Any, class_name: str) -> nn.Module | None:
    """The model of ``config`` built on the meta device (no weights read or allocated), its
    RoPE frequencies computed for real (convert checks them); None when it cannot be built."""
    import torch
    import transformers
    from torch import Tensor

    try:
        with torch.device("meta"):
            skeleton = getattr(transformers, class_name).from_config(copy.deepcopy(config))
        for path, module in list(skeleton.named_modules()):
            freq = getattr(module, "inv_freq", None)
            if isinstance(freq, Tensor) and freq.is_meta:  # RoPE frequencies are checked
                parent, _, name = path.rpartition(".")
                setattr(skeleton.get_submodule(parent) if parent else skeleton, name,
                        type(module)(config=skeleton.config))
    except Exception:  # noqa: BLE001  (no skeleton: the conversion itself will tell)
        return None
    return skeleton


def _dry_run(config: Any, class_name: str, mechanism: str, args: dict[str, Any]
             ) -> str | None:
    """convert's refusal of ``mechanism`` for the model of ``config``, found on a skeleton
    of the model on the meta device (no weights read or allocated); None when it converts
    or the skeleton cannot be built (the real conversion then decides)."""
    from attnlab.integrations.convert import convert

    skeleton = _skeleton(config, class_name)
    if skeleton is None:
        return None
    try:
        convert(skeleton, mechanism, **args)
    except ValueError as err:
        return str(err)
    except Exception:  # noqa: BLE001  (a meta-device limitation, not a refusal)
        return None
    return None


def _transfer_dry_run(config: Any, class_name: str, mechanism: str, args: dict[str, Any],
                      loss: str) -> str | None:
    """attention_transfer's refusal of ``loss`` for the model of ``config`` converted to
    ``mechanism`` (``distill.loss_refusal``, the message of the refusal after loading),
    found before any weight is read: on a skeleton on the meta device whose first attention
    layer alone is put on the CPU with random weights (normal, the config's
    initializer_range) and converted. None when the loss can train, the mechanism has no
    new parameters or the stand-in cannot be built (the transfer then decides)."""
    import torch

    from attnlab.integrations.convert import convert, converted_modules, new_parameters
    from attnlab.integrations.distill import loss_refusal

    try:
        first = _skeleton(config, class_name)
        if first is None:
            return None
        convert(first, mechanism, **args)  # on the meta device: where the first layer lies
        found = converted_modules(first)
        if not found or not new_parameters(first):
            return None
        path, module = found[0]
        stand_in = _skeleton(config, class_name)
        if stand_in is None:
            return None
        std = float(getattr(config, "initializer_range", None) or 0.02)
        draw = torch.Generator().manual_seed(0)
        for part in (path, *module.teacher_parts):
            real = stand_in.get_submodule(part).to_empty(device="cpu")
            with torch.no_grad():
                for p in real.parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, std, generator=draw)
                    else:
                        p.zero_()
        convert(stand_in, mechanism, **args)
        return loss_refusal(converted_modules(stand_in)[0][1], loss)
    except Exception:  # noqa: BLE001  (no stand-in: the transfer itself will tell)
        return None


def _guard(folder: Path, run: dict[str, Any]) -> None:
    """``folder/run.json`` records the run the checkpoints belong to; another run's folder
    is refused (its checkpoints would be loaded into another model or data)."""
    from attnlab.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    if path.exists():
        before = json.loads(path.read_text())
        differ = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
        if differ:
            said = "; ".join(f"{k}: {before.get(k)!r} there, {run.get(k)!r} now"
                             for k in differ)
            raise click.UsageError(f"--checkpoint {folder} holds the checkpoints of another "
                                   f"run ({said}): pass another folder")
        return
    write_atomic(path, json.dumps(run, indent=1))


def _checked_device(device: str) -> str:
    """``--device`` as torch reads it (a clean usage error for a name torch does not know,
    or CUDA that this torch does not see)."""
    import torch

    from attnlab.cli.convert import _device

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise click.UsageError(f"--device {device}: not a device torch knows ({err}); "
                               "e.g. cpu, cuda, cuda:1, mps") from None
    return _device(device)


def _given_without(ctx: click.Context, pairs: Sequence[tuple[str, str, bool]]) -> None:
    """Refuse an option given on the command line whose stage does not run: (option name,
    the option that enables it, whether that stage runs)."""
    from click.core import ParameterSource

    for name, needs, on in pairs:
        param = name.lstrip("-").replace("-", "_")
        if name == "--finetune-steps":
            param = "finetune_steps"
        if not on and ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{name} needs {needs} (without it {name} would do "
                                   "nothing)")


def _check_folders(source: Path, out: Path, checkpoint: Path | None) -> None:
    """Refuse an --out or --checkpoint that would write into the source checkpoint (its
    model.safetensors overwritten, or training files among its own) or into another
    save_pretrained checkpoint."""
    if out.resolve() == source.resolve():
        raise click.UsageError(f"--out {out} is the source checkpoint folder {source}: saving "
                               "there would overwrite its model.safetensors; pass another "
                               "folder")
    if (out / "config.json").is_file():
        raise click.UsageError(f"--out {out} holds a transformers checkpoint (config.json): "
                               "saving there would overwrite its weights; pass another folder")
    if checkpoint is not None and checkpoint.resolve() == source.resolve():
        raise click.UsageError(f"--checkpoint {checkpoint} is the source checkpoint folder: "
                               "pass another folder for the training checkpoints")


def _position_limit(config: Any, kind: str) -> tuple[str, int] | None:
    """(config field, value) of the learned position table that bounds the tokens a model
    reads (GPT-2's n_positions, BERT's max_position_embeddings); None for RoPE models,
    whose max_position_embeddings is the length they were trained to, not a table size."""
    field = {"gpt2": "n_positions", "bert": "max_position_embeddings"}.get(kind)
    value = getattr(config, field, None) if field else None
    return None if value is None else (str(field), int(value))


def _as_options(message: str) -> str:
    """A library message in the command's words: loss='x' -> --distill x."""
    return re.sub(r"loss='(\w+)'", r"--distill \1", message)


def _transfer_refused(distill: str, message: str) -> click.UsageError:
    """attention_transfer's refusal (``message``) as the usage error of ``--distill``."""
    said = _as_options(message)
    return click.UsageError(said if "--distill" in said else f"--distill {distill}: {said}")


def _rounded(value: Any) -> Any:
    """Floats in ``value`` (nested) to 4 significant digits, for printing."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@contextlib.contextmanager
def _stage(checkpoint: Path | None, name: str) -> Iterator[None]:
    """A training stage: its library warnings printed as plain lines (not as a line of
    this module), and on Ctrl-C which checkpoint step is on disk before the interrupt
    goes on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except KeyboardInterrupt:
            from attnlab.integrations.distill import checkpoint_step

            path = None if checkpoint is None else checkpoint / name
            at = checkpoint_step(path) if path is not None and path.is_file() else None
            console.print("interrupted: " + (
                "no --checkpoint, nothing kept" if path is None else
                f"no {name} written yet in {escape(str(checkpoint))}" if at is None else
                f"{escape(str(path))} holds step {at}; rerun the same command to resume "
                "from it"))
            raise
        finally:
            for warning in caught:
                console.print(f"warning: {escape(str(warning.message))}", soft_wrap=True)


BASE = "finetune.json"  # --checkpoint: the attention transfer finetune.pt continues


def _check_resume(folder: Path, loss: str | None, steps: int, tune: str | None,
                  finetune_steps: int) -> dict[str, Any]:
    """Refuse a --checkpoint folder whose checkpoints this run cannot continue: a transfer
    or fine-tuning checkpoint past the steps asked for, or a fine-tuning checkpoint made
    after another attention transfer (other --steps; fine-tuning on from it would save a
    model that is not the one the recipe describes). Returns the record of the transfer a
    fine-tuning checkpoint belongs to (written to ``folder/finetune.json``)."""
    from attnlab.integrations.distill import checkpoint_step, past_steps

    base = {"distill": loss, "steps": steps if loss else 0}
    for name, option, stage, asked in (("transfer.pt", "--steps", loss, steps),
                                       ("finetune.pt", "--finetune-steps", tune,
                                        finetune_steps)):
        at = checkpoint_step(folder / name) if stage and (folder / name).is_file() else None
        why = None if at is None else past_steps(folder / name, at, asked, option)
        if why is not None:
            raise click.UsageError(f"--checkpoint: {why}")
    tuned = folder / "finetune.pt"
    if tune and tuned.is_file():
        record = folder / BASE
        before = json.loads(record.read_text()) if record.is_file() else None
        if before != base:
            made = ("an unrecorded attention transfer" if before is None else
                    "no attention transfer" if not before.get("distill") else
                    f"an attention transfer of {before['steps']} steps")
            now = (f"--steps {steps}" if loss else "no --distill")
            hint = (f"pass --steps {before['steps']} to resume it, or "
                    if before is not None and before.get("distill") == loss else "")
            raise click.UsageError(f"--checkpoint {folder}: its finetune.pt fine-tunes the "
                                   f"model after {made}, this run asks for {now}: "
                                   f"{hint}delete {tuned} to fine-tune anew")
    return base


# ------------------------------------------------------------------------- command
@click.command("hf")
@click.pass_context
@click.argument("source")
@conversion_options
@click.option("--finetune", "objective", type=click.Choice(OBJECTIVES), default="none",
              show_default=True,
              help="Fine-tuning after the transfer: lm (next-token loss; causal models), "
                   "logits (KL to the unconverted model's outputs; causal models) or hidden "
                   "(MSE to its final hidden states).")
@click.option("--finetune-steps", type=click.IntRange(0), default=100, show_default=True)
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=1e-4,
              show_default=True)
@click.option("--lora", type=click.IntRange(1), default=None,
              help="Fine-tune LoRA adapters of this rank on q, k, v, o (and the new "
                   "parameters) instead of every weight; needs peft.")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Fold the LoRA adapters into the weights before saving (--no-merge saves "
                   "them as adapters; loading them back needs peft).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False),
              help="Plain UTF-8 text to train and evaluate on: its non-empty lines, the last "
                   "tenth held out [default: the bundled char_lm corpus's sentences].")
@click.option("--length", type=click.IntRange(2), default=128, show_default=True,
              help="Tokens per window (causal models) or per line at most (encoders); the "
                   "default is lowered to a GPT-2's n_positions or a BERT's "
                   "max_position_embeddings when those are smaller.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--eval", "count", type=click.IntRange(2), default=64, show_default=True,
              help="Held-out windows (causal models) or lines (encoders) to evaluate on.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the new parameters' initialisation, the data order and training.")
@DEVICE_OPTION
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path),
              help="A folder for the training checkpoints (transfer.pt, finetune.pt, written "
                   "every --every steps and at the end): rerunning the same command resumes "
                   "from them.")
@click.option("--every", type=click.IntRange(1), default=50, show_default=True,
              help="Checkpoint interval in steps (with --checkpoint).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to save the converted model in (model.safetensors, convert.json; "
                   "attnlab.integrations.saved.load_converted loads it).")
def hf_cmd(ctx: click.Context, source: str, mechanism: str, kw: tuple[str, ...],
           distill: str, steps: int, lr: float, objective: str, finetune_steps: int,
           finetune_lr: float,
           lora: int | None, merge: bool, text: str | None, length: int, batch_size: int,
           count: int, seed: int, device: str, checkpoint: Path | None, every: int,
           out: Path) -> None:
    """A local transformers checkpoint SOURCE (a save_pretrained folder with config.json,
    weights and tokenizer; or 'minilm', the bundled all-MiniLM-L6-v2) converted to
    MECHANISM, optionally distilled (--distill) and fine-tuned (--finetune, --lora),
    evaluated on held-out text against the unconverted model (perplexity for causal models;
    embedding cosine and nearest-neighbour agreement for encoders) and saved to --out.

    \b
    Examples:
      attnlab convert hf ./my-gpt2 --mechanism hedgehog --distill auto --steps 200 --out x
      attnlab convert hf minilm --mechanism hedgehog --distill auto --steps 20 --out y
      attnlab convert hf ./llama --mechanism hedgehog --distill auto --finetune logits \\
          --lora 8 --checkpoint ckpt --out z     (rerun it to resume from ckpt)
    """
    import torch
    from click.core import ParameterSource

    from attnlab.cli.convert import _distill_loss, _kwargs
    from attnlab.heads.studies import conversion as cv
    from attnlab.integrations import saved
    from attnlab.integrations.convert import convert, new_parameters, refusal

    kwargs = _kwargs(kw)
    device = _checked_device(device)
    loss = _distill_loss(distill)
    tune = None if objective == "none" else objective
    _given_without(ctx, [("--steps", "--distill auto|hedgehog|lolcats", bool(loss)),
                         ("--lr", "--distill auto|hedgehog|lolcats", bool(loss)),
                         ("--finetune-steps", "--finetune lm|logits|hidden", bool(tune)),
                         ("--finetune-lr", "--finetune lm|logits|hidden", bool(tune)),
                         ("--every", "--checkpoint FOLDER", checkpoint is not None)])
    if loss and not steps:
        raise click.UsageError(f"--distill {distill} needs --steps N > 0")
    if tune and not finetune_steps:
        raise click.UsageError(f"--finetune {objective} needs --finetune-steps N > 0")
    if lora is not None and tune is None:
        raise click.UsageError("--lora RANK needs --finetune lm|logits|hidden")
    if lora is not None:
        from attnlab.integrations.finetune import require_peft

        try:
            require_peft()
        except ImportError as err:
            raise click.UsageError(f"--lora: {err}") from None
    try:
        chosen = cv.contestant(mechanism, kwargs)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    # what the config says, before any weight is read
    try:
        config = saved.source_config(source)
        kind = str(config.model_type)
        class_name = saved.auto_class(kind)
    except (FileNotFoundError, ImportError) as err:
        raise click.UsageError(str(err)) from None
    except ValueError as err:
        raise click.UsageError(f"convert refused: {source} ({config.model_type}) -> "
                               f"{chosen.mechanism}: {err}") from None
    except OSError as err:
        raise click.UsageError(f"{source}: {err}") from None
    _check_folders(saved.source_folder(source), out, checkpoint)
    causal = kind != "bert"
    limit = _position_limit(config, kind)
    if limit is not None and length > limit[1]:
        field, most = limit
        if ctx.get_parameter_source("length") is ParameterSource.DEFAULT:
            console.print(f"--length {most}: {escape(source)}'s {field} (the default, "
                          f"{length}, is longer)")
            length = most
        else:
            raise click.UsageError(f"--length {length}: {source} has learned positions for "
                                   f"{most} tokens ({field} in its config.json): pass "
                                   f"--length {most} or less")
    trained = getattr(config, "max_position_embeddings", None) if limit is None else None
    if trained is not None and length > int(trained):  # RoPE: no table, nothing to crash
        console.print(f"note: --length {length} is past {escape(source)}'s "
                      f"max_position_embeddings ({trained}); its rotary positions have no "
                      "table to overflow, but the model was not trained on positions that far")
    if not causal and tune in ("lm", "logits"):
        raise click.UsageError(f"--finetune {tune}: {source} is a {kind} encoder without a "
                               "language-model head (no logits); use --finetune hidden")
    window = getattr(config, "sliding_window", None) if kind == "mistral" or (
        kind == "qwen2" and getattr(config, "use_sliding_window", False)) else None
    if window is not None and length > int(window):
        raise click.UsageError(f"--length {length}: {source} attends within a sliding window "
                               f"of {window} tokens, which the converted modules do not "
                               f"implement (exact up to {window} tokens): pass --length "
                               f"{window} or less")
    args = cv._resolved(chosen.kwargs, length if causal else None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    why = refusal(chosen.mechanism, causal=causal, rope=kind in ("llama", "qwen2", "mistral"),
                  gqa=kv != heads)
    who = f"{source} ({kind}) -> {chosen.mechanism}"
    if why is None:
        why = _dry_run(config, class_name, chosen.mechanism, args)
        if why is not None:
            raise click.UsageError(f"convert refused: {why}")
    else:
        raise click.UsageError(f"convert refused: {who}: {why}")
    if loss == "hedgehog":  # the only loss refused for what the mechanism is ("auto" picks)
        why = _transfer_dry_run(config, class_name, chosen.mechanism, args, loss)
        if why is not None:
            raise _transfer_refused(distill, why)
    try:
        if source != saved.MINILM:
            saved.source_weights(source)
        tokenizer = saved.load_tokenizer(source)
    except (FileNotFoundError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    train, held, described = _lines(text)
    batches, test = _data(tokenizer, causal, train, held, length, batch_size, count, seed)
    batches = [_on(b, device) for b in batches]
    if checkpoint is not None:
        _guard(checkpoint, {
            "source": source if source == saved.MINILM else str(Path(source).resolve()),
            "mechanism": chosen.mechanism, "kwargs": args, "text": described,
            "length": length, "batch_size": batch_size, "seed": seed, "distill": loss,
            "lr": lr, "finetune": tune, "finetune_lr": finetune_lr, "lora": lora})
        base = _check_resume(checkpoint, loss, steps, tune, finetune_steps)

    with console.status(f"loading {source} ..."):
        try:
            model, _ = saved.load_source(source)
        except (FileNotFoundError, ValueError) as err:
            raise click.UsageError(str(err)) from None
    model = model.to(device)
    names = {"teacher": "teacher (unconverted)", "converted": "converted",
             "distilled": "after attention transfer", "finetuned": "after fine-tuning"}
    scores: dict[str, Any] = {}
    reference = None
    if causal:
        scores["teacher"] = perplexity(model, test, batch_size)
    else:
        reference = _embeddings(model, tokenizer, test, batch_size, length)

    def score(stage: str) -> None:
        if causal:
            scores[stage] = perplexity(model, test, batch_size)
        else:
            assert reference is not None
            scores[stage] = cv.embedding_agreement(
                _embeddings(model, tokenizer, test, batch_size, length), reference)

    frozen = None
    if tune in ("logits", "hidden") and lora is None:  # full fine-tuning distils from a copy
        frozen = copy.deepcopy(model).eval()
    torch.manual_seed(seed)
    try:
        convert(model, chosen.mechanism, **args)
    except ValueError as err:
        raise click.UsageError(f"convert refused: {err}") from None
    new = sum(p.numel() for p in new_parameters(model).values())
    score("converted")
    transfer = None
    if loss and new:
        from attnlab.integrations.distill import attention_transfer

        with _stage(checkpoint, "transfer.pt"):
            try:
                transfer = attention_transfer(
                    model, batches, loss=loss, steps=steps, lr=lr, seed=seed, every=every,
                    checkpoint=None if checkpoint is None else checkpoint / "transfer.pt")
            except ValueError as err:
                raise _transfer_refused(distill, str(err)) from None
        if transfer.untrained and len(transfer.untrained) == len(new_parameters(model)):
            hint = ("convert without --distill" if "lolcats" in transfer.loss
                    else "use --distill lolcats")
            raise click.UsageError(f"--distill {distill}: the {transfer.loss} loss reached "
                                   f"none of {chosen.mechanism}'s new parameters (no "
                                   "gradient): nothing was trained, nothing saved; "
                                   f"{hint}")
        console.print(escape(str(transfer)))
        score("distilled")
    elif loss:
        console.print(f"{chosen.mechanism} has no new parameters: nothing to transfer")
    tuned = None
    if tune:
        from attnlab.integrations.finetune import finetune, merge_lora

        if checkpoint is not None:
            from attnlab.files import write_atomic

            write_atomic(checkpoint / BASE, json.dumps(base))
        with _stage(checkpoint, "finetune.pt"):
            try:
                tuned = finetune(model, batches, objective=tune, teacher=frozen, lora=lora,
                                 steps=finetune_steps, lr=finetune_lr, seed=seed,
                                 every=every, checkpoint=None if checkpoint is None
                                 else checkpoint / "finetune.pt")
            except ValueError as err:
                raise click.UsageError(f"--finetune {tune}: {err}") from None
        if lora is not None and merge:
            merge_lora(model)
        console.print(escape(str(tuned)))
        score("finetuned")
    del frozen
    model.eval()

    unit = f"windows of {length} tokens" if causal else "lines"
    console.print(f"{escape(who)}: {len(test)} held-out {unit}; text: {escape(described)}")
    table = Table()
    table.add_column("model")
    if causal:
        table.add_column("perplexity", justify="right")
        table.add_column("vs teacher", justify="right")
        for stage, value in scores.items():
            table.add_row(names[stage], f"{value:.3f}", "" if stage == "teacher" else
                          f"{value / scores['teacher']:.3f}x")
    else:
        table.add_column("cosine to teacher", justify="right")
        table.add_column("NN agreement", justify="right")
        table.add_row(names["teacher"], "1 (reference)", "1 (reference)")
        for stage, value in scores.items():
            table.add_row(names[stage], f"{value['cosine']:.4f}",
                          f"{value['nn_agreement']:.4f}")
    console.print(table)
    recipe = {
        "source": source, "kwargs": args, "seed": seed, "mechanism": chosen.mechanism,
        "contestant": chosen.label, "new_parameters": new, "text": described,
        "length": length, "batch_size": batch_size, "eval": len(test),
        "distill": None if transfer is None else {
            "loss": transfer.loss, "steps": transfer.steps, "lr": lr,
            "first": transfer.first(), "last": transfer.last()},
        "finetune": None if tuned is None else {
            "objective": tune, "steps": tuned.steps, "lr": finetune_lr, "lora": lora,
            "merged": bool(lora is not None and merge), "trainable": tuned.trainable,
            "first": tuned.losses[0] if tuned.losses else None,
            "last": tuned.losses[-1] if tuned.losses else None},
        "scores": {"metric": "perplexity" if causal else "embedding agreement", **scores}}
    saved.save_converted(model, out, recipe)
    console.print(f"{escape(who)}: {new:,} new parameters; saved: {escape(str(out))}"
                  f"/model.safetensors and convert.json (load_converted loads it)")


@click.command("load")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="cpu", show_default=True)
def load_cmd(folder: Path, device: str) -> None:
    """Load a model saved by 'attnlab convert hf' (FOLDER) back from its source checkpoint
    (attnlab.integrations.saved.load_converted) and print what made it and its scores."""
    from attnlab.integrations import saved
    from attnlab.integrations.convert import converted_modules

    try:
        info = saved.read_converted(folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = saved.load_converted(folder, device=_checked_device(device))
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise click.UsageError(str(err)) from None
    for warning in caught:
        console.print(f"warning: {escape(str(warning.message))}", soft_wrap=True)
    found = converted_modules(model)
    src = info["source"]
    console.print(f"{escape(str(folder))}: {src['model_class']} from {escape(src['path'])}, "
                  f"{len(found)} attention layers on {info['mechanism']} "
                  f"{escape(json.dumps(info['kwargs']))}"
                  + (f", LoRA rank {info['lora']['rank']} (unmerged)" if info["lora"] else ""),
                  soft_wrap=True)
    recipe = info["recipe"]
    for key in ("distill", "finetune", "scores"):
        if recipe.get(key) is not None:
            console.print(f"{key}: {escape(json.dumps(_rounded(recipe[key])))}", soft_wrap=True)
    prov = info["provenance"]
    console.print(f"made by attnlab {prov['attnlab']} (commit {prov['commit']}), "
                  f"{prov['date']}: {escape(prov['command'])}", soft_wrap=True)
