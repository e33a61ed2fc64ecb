"""``attnlab convert``: a softmax model moved onto another mechanism, evaluated against its
teacher, and the conversion study (docs/results/conversion.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from attnlab.arena.files import DEFAULT_REPORTS, DEFAULT_STORE
from attnlab.cli.convert_hf import DEVICE_OPTION, DISTILL, KW_OPTION, LR_OPTION, conversion_options

console = Console()


def _kwargs(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs, each value read as JSON (``4``, ``true``, ``"exp"``) or else as
    a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--kw")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: this torch sees no CUDA device")
    return device


def _distill_loss(distill: str) -> str | None:
    from attnlab.heads.studies.conversion import distill_available

    if distill == "none":
        return None
    if not distill_available():
        raise click.UsageError(f"--distill {distill}: attention transfer needs "
                               "attnlab.integrations.distill, which this attnlab does not have")
    return distill


@click.group("convert", context_settings={"help_option_names": ["-h", "--help"]})
def convert() -> None:
    """Convert a softmax model to another mechanism and measure what it keeps of its teacher.

    \b
    Examples:
      attnlab convert minilm --mechanism hedgehog --out converted/minilm-hedgehog
      attnlab convert lm --mechanism gated --teacher-steps 150
      attnlab convert hf ./my-llama --mechanism hedgehog --distill auto --steps 200 --out x
      attnlab convert hf minilm --mechanism hedgehog --distill auto --steps 20 --out y
      attnlab convert load x
      attnlab convert study --seeds 3 --out docs/results/conversion
    """


@convert.command("minilm")
@conversion_options
@click.option("--sentences", type=click.IntRange(2), default=128, show_default=True,
              help="Held-out sentences (char_lm corpus, test part) to compare on.")
@click.option("--seed", type=int, default=0, show_default=True)
@DEVICE_OPTION
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/convert/minilm-MECH].")
def minilm_cmd(mechanism: str, kw: tuple[str, ...], distill: str, steps: int, lr: float,
               sentences: int, seed: int, device: str, out: str | None) -> None:
    """all-MiniLM-L6-v2 (bundled, offline) converted to MECHANISM: cosine of its sentence
    embeddings to the teacher's and nearest-neighbour agreement on held-out sentences; saves
    the converted model (model.safetensors), the recipe and the numbers (convert.json)."""
    import torch

    from attnlab.heads.studies import conversion as cv
    from attnlab.integrations.convert import convert as to_mechanism
    from attnlab.integrations.convert import new_parameters, refusal

    kwargs = _kwargs(kw)
    device = _device(device)
    loss = _distill_loss(distill)
    try:
        chosen = cv.contestant(mechanism, kwargs)
        held = cv.held_out_sentences(sentences, seed)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    args = cv._resolved(chosen.kwargs, None)
    why = refusal(chosen.mechanism, causal=False, rope=False, gqa=False)
    if why is not None:  # known before loading the model
        raise click.UsageError(f"convert refused: all-MiniLM-L6-v2 (bert) -> "
                               f"{chosen.mechanism}: {why}")
    from attnlab.integrations.hf import load_minilm, sentence_embeddings

    with console.status("loading all-MiniLM-L6-v2 ..."):
        teacher, tokenizer = load_minilm()
        student, _ = load_minilm()
    torch.manual_seed(seed)
    try:
        to_mechanism(student, chosen.mechanism, **args)
    except (ValueError, TypeError) as err:
        raise click.UsageError(f"convert refused: {err}") from None
    teacher, student = teacher.to(device), student.to(device)
    new = sum(p.numel() for p in new_parameters(student).values())
    if loss and steps and new:
        pool = cv.sentence_pool("train")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + seed))
        data = cv.minilm_batches(tokenizer, [pool[int(i)] for i in order[:512]], 16, device)
        with console.status(f"attention transfer ({loss}, {steps} steps) ..."):
            log = cv.distill(student, data, loss, steps, lr, seed)
        console.print(escape(str(log)))
    student.eval()
    with console.status(f"embedding {sentences} held-out sentences ..."):
        scores = cv.embedding_agreement(sentence_embeddings(student, tokenizer, held),
                                        sentence_embeddings(teacher, tokenizer, held))
    recipe = {"model": "all-MiniLM-L6-v2", "mechanism": chosen.mechanism,
              "contestant": chosen.label, "kwargs": args, "distill": loss,
              "steps": steps if loss else 0, "lr": lr, "seed": seed,
              "new_parameters": new}
    target = Path(out) if out else Path(DEFAULT_REPORTS) / "convert" / \
        f"minilm-{chosen.label.replace('+', 'p')}"
    _save(target, student, recipe, {"sentences": sentences, **scores})
    console.print(f"all-MiniLM-L6-v2 -> {escape(chosen.label)} ({chosen.mechanism}, "
                  f"{new:,} new parameters, distill: {loss or 'none'})")
    console.print(f"cosine to the teacher: {scores['cosine']:.4f}   nearest-neighbour "
                  f"agreement: {scores['nn_agreement']:.4f}   ({sentences} held-out sentences)")
    console.print(f"saved: {target / 'model.safetensors'} and {target / 'convert.json'}")


def _save(target: Path, model: Any, recipe: dict[str, Any], scores: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from attnlab.arena.files import write_atomic
    from attnlab.machine import describe, machine

    target.mkdir(parents=True, exist_ok=True)
    state = {k: t.detach().cpu().contiguous() for k, t in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"))
    write_atomic(target / "convert.json", json.dumps(
        {"recipe": recipe, "scores": scores, "machine": describe(machine())}, indent=1))


@convert.command("lm")
@click.option("--mechanism", required=True, help="A contestant or a registered mechanism.")
@KW_OPTION
@click.option("--teacher", "teacher_key", default=None,
              help="A char_lm softmax run key of --store as the teacher [default: train one "
                   "with --teacher-steps].")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--teacher-steps", type=click.IntRange(1), default=150, show_default=True)
@click.option("--steps", type=click.IntRange(0), default=0, show_default=True,
              help="Training steps of the from-scratch baseline, and attention-transfer steps "
                   "with --distill (0: neither).")
@click.option("--distill", type=click.Choice(DISTILL), default="none", show_default=True,
              help="Attention transfer of the new parameters, teacher-forced by the softmax "
                   "teacher's blocks (attnlab.integrations.distill).")
@LR_OPTION
@click.option("--windows", type=click.IntRange(1), default=128, show_default=True,
              help="Held-out test windows for the perplexity.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/convert/lm-MECH].")
def lm_cmd(mechanism: str, kw: tuple[str, ...], teacher_key: str | None, store: str,
           teacher_steps: int, steps: int, distill: str, lr: float, windows: int, seed: int,
           device: str, out: str | None) -> None:
    """A causal softmax TransformerLM (char_lm) converted to MECHANISM: perplexity of the
    teacher, of the converted model, (with --distill and --steps) of the converted model
    after attention transfer of its new parameters (conversion.lm_as_converted with
    attnlab.integrations.distill) and (with --steps) of the mechanism trained from scratch
    for as many steps; saves the (distilled) converted model, the recipe and the numbers."""
    from attnlab.heads.studies import conversion as cv

    kwargs = _kwargs(kw)
    device = _device(device)
    loss = _distill_loss(distill)
    if loss and not steps:
        raise click.UsageError(f"--distill {distill} needs --steps N > 0 (transfer steps)")
    try:
        chosen = cv.contestant(mechanism, kwargs)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if teacher_key is not None:
        teacher = _stored_teacher(store, teacher_key, device)
    else:
        with console.status(f"training the softmax teacher ({teacher_steps} steps) ..."):
            teacher = cv.train_lm("softmax", {}, seed, teacher_steps,
                                  {"length": 64, "eval_windows": 128},
                                  {"dim": 64, "depth": 2, "heads": 4}, device)
    length = int(teacher.task_params.get("length", 128))
    args = cv._resolved(chosen.kwargs, length)
    try:
        student = cv.convert_lm(teacher, chosen.mechanism, args, seed)
    except ValueError as err:
        raise click.UsageError(f"convert refused: {err}") from None
    inputs, targets = cv.lm_windows(length, windows)
    new = sum(v.numel() for k, v in student.state_dict().items()
              if k not in teacher.model.state_dict())
    scores = {"teacher": cv.perplexity(teacher.model, inputs, targets),
              "converted": cv.perplexity(student, inputs, targets), "windows": windows}
    log = None
    if loss and new:
        data = [b.to(device) for b in cv.lm_distill_batches(length, steps, seed)]
        with console.status(f"attention transfer ({loss}, {steps} steps) ..."), \
                cv.lm_as_converted(student, teacher) as wrapped:
            log = cv.distill(wrapped, data, loss, steps, lr, seed)
        console.print(str(log))
        scores["distilled"] = cv.perplexity(student, inputs, targets)
    if steps:
        with console.status(f"training {chosen.label} from scratch ({steps} steps) ..."):
            scratch = cv.train_lm(chosen.mechanism, args, seed, steps, teacher.task_params,
                                  teacher.model_args, device)
        scores["scratch"] = cv.perplexity(scratch.model, inputs, targets)
    recipe = {"model": "TransformerLM char_lm", "teacher": teacher_key or
              f"trained {teacher_steps} steps", "task_params": teacher.task_params,
              "model_args": teacher.model_args, "mechanism": chosen.mechanism,
              "contestant": chosen.label, "kwargs": args,
              "distill": None if log is None else log.loss,
              "transfer_steps": 0 if log is None else log.steps, "lr": lr,
              "scratch_steps": steps, "seed": seed, "new_parameters": new}
    target = Path(out) if out else Path(DEFAULT_REPORTS) / "convert" / \
        f"lm-{chosen.label.replace('+', 'p')}"
    _save(target, student, recipe, scores)
    scratch_text = f"   {chosen.label} from scratch ({steps} steps): {scores['scratch']:.3f}" \
        if "scratch" in scores else ""
    said = "not distilled" if log is None else f"distilled: {log.loss}, {log.steps} steps"
    distilled_text = f"   distilled {scores['distilled']:.3f}" if "distilled" in scores else ""
    console.print(f"TransformerLM -> {escape(chosen.label)} ({chosen.mechanism}, {new:,} new "
                  f"parameters, {said})")
    console.print(f"perplexity on {windows} held-out windows: teacher {scores['teacher']:.3f}"
                  f"   converted {scores['converted']:.3f}{distilled_text}"
                  f"{escape(scratch_text)}")
    console.print(f"saved: {target / 'model.safetensors'} and {target / 'convert.json'}")


def _stored_teacher(store: str, key: str, device: str) -> Any:
    from attnlab.heads.runs import load_run
    from attnlab.heads.studies.conversion import LMTeacher

    try:
        run = load_run(store, key)
    except (KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise click.UsageError(str(message)) from None
    spec = run.row["config"]
    if spec["task"] != "char_lm" or spec["mechanism"] != "softmax":
        raise click.UsageError(f"run {run.key} is {spec['mechanism']} on {spec['task']}: the "
                               "teacher must be a softmax char_lm run")
    return LMTeacher(run.model.to(device), dict(spec["task_params"]), dict(spec["model"]),
                     int(spec["train"]["steps"]), int(run.row["seed"]))


@convert.command("study")
@click.option("--mechanisms", default="softmax,hedgehog,elu+1,identity,sigmoid,gated,lssa,"
              "neighborhood", show_default=True, help="Comma-separated contestants.")
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--parts", default="minilm,lm", show_default=True,
              help="minilm, lm or both.")
@click.option("--sentences", type=click.IntRange(2), default=128, show_default=True)
@click.option("--teacher-steps", type=click.IntRange(1), default=150, show_default=True)
@click.option("--steps", type=click.IntRange(0), default=50, show_default=True,
              help="Attention-transfer steps and the from-scratch baseline's steps.")
@click.option("--windows", type=click.IntRange(1), default=128, show_default=True)
@click.option("--length", type=click.IntRange(8), default=64, show_default=True,
              help="char_lm context length of the causal teacher.")
@click.option("--dim", type=click.IntRange(8), default=64, show_default=True,
              help="Width of the causal teacher.")
@click.option("--distill", type=click.Choice(DISTILL), default="auto",
              show_default=True, help="Attention transfer (skipped, and said so, when "
                                      "attnlab.integrations.distill is absent).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-2,
              show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/conversion].")
def study_cmd(mechanisms: str, seeds: int, parts: str, sentences: int, teacher_steps: int,
              steps: int, windows: int, length: int, dim: int, distill: str, lr: float,
              device: str, out: str | None) -> None:
    """The conversion reproduction: Hedgehog against elu+1, identity (Taylor) and the other
    conversions, on MiniLM and on a causal char-LM teacher, paired over seeds."""
    from attnlab.arena.files import write_atomic
    from attnlab.arena.report import write_document
    from attnlab.heads.studies import conversion as cv
    from attnlab.machine import describe, machine, provenance

    names = [n.strip() for n in mechanisms.split(",") if n.strip()]
    which = tuple(p.strip() for p in parts.split(",") if p.strip())
    device = _device(device)
    loss = None if distill == "none" else distill
    distilled = loss is not None and cv.distill_available()
    try:
        for name in names:
            cv.contestant(name)
        if not set(which) <= {"minilm", "lm"} or not which:
            raise ValueError(f"--parts: minilm, lm or both, got {parts!r}")
        if "minilm" in which:
            cv.held_out_sentences(sentences, 0)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    total = len(names) * seeds * len(which)
    done = [0]

    def tick() -> None:
        done[0] += 1
        console.print(f"  {done[0]}/{total} done")

    numbers, sections, images = cv.conversion_study(
        names, list(range(seeds)), sentences=sentences, teacher_steps=teacher_steps,
        steps=steps, windows=windows, distill_loss=loss, lr=lr, device=device, parts=which,
        task_params={"length": length, "eval_windows": windows},
        model_args={"dim": dim, "depth": 2, "heads": 4}, tick=tick)
    command = (f"attnlab convert study --mechanisms {','.join(names)} --seeds {seeds} "
               f"--parts {','.join(which)} --sentences {sentences} --teacher-steps "
               f"{teacher_steps} --steps {steps} --windows {windows} --length {length} --dim "
               f"{dim} --distill {distill} --lr {lr} --device {device}")
    me = provenance()
    setup = [f"command: `{command}`", f"machine: {describe(machine())}",
             f"attnlab {me['attnlab']} (commit {me['commit']}), {me['date']}",
             "distillation (both arms; the causal TransformerLMs through "
             "conversion.lm_as_converted, the teacher's softmax attention of each block as "
             "the layer's teacher): " +
             (f"attention_transfer loss={loss}, {steps} steps, lr {lr}, batches of 16 "
              "training-part sentences (MiniLM) and of 32 training-part windows (char-LM), "
              "teacher forcing" if distilled else
                                 "none (converted models are evaluated as converted: "
                                 + ("attnlab.integrations.distill is absent"
                                    if loss else "--distill none") + ")"),
             "contestants: " + "; ".join(f"{n} = {cv.contestant(n).mechanism} "
                                         f"{cv.contestant(n).kwargs or ''} "
                                         f"({cv.contestant(n).what})" for n in names)]
    target = Path(out) if out else Path(DEFAULT_REPORTS) / "conversion"
    md, page = write_document(target, "Conversion of softmax models: what each mechanism "
                              "keeps of its teacher", setup, sections, images)
    write_atomic(target / "results.json", json.dumps(
        {"setup": setup, **numbers}, indent=1, default=str))
    console.print(f"report: {md} and {page} (numbers: {target / 'results.json'})")


# any local transformers checkpoint (attnlab.cli.convert_hf): convert hf, convert load
from attnlab.cli.convert_hf import hf_cmd, load_cmd  # noqa: E402

convert.add_command(hf_cmd)
convert.add_command(load_cmd)
