"""``attnlab heads``: look inside the heads of MiniLM or of a trained arena run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnlab.arena.files import DEFAULT_REPORTS, DEFAULT_STORE

console = Console()
MODEL_HELP = ("minilm (all-MiniLM-L6-v2, needs the hf extra), an arena run key (or its first "
              "characters) of --store, or a saved model <store>/models/<key>.safetensors")


def _subject(model: str, store: str) -> Any:
    from attnlab.heads.subjects import open_subject

    try:
        with console.status(f"loading {escape(model)} ..."):
            return open_subject(model, store)
    except (KeyError, FileNotFoundError, ImportError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise click.UsageError(str(message)) from None


def _slug(model: str) -> str:
    name = Path(model).stem if model.endswith(".safetensors") else model
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]


def _run(title: str, total: int, work: Callable[[Callable[[], None]], Any]) -> Any:
    columns = (TextColumn("{task.description:<30}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(title, total=total)
        return work(lambda: progress.advance(bar))


def _write(out: Path, title: str, subject: Any, parts: list[tuple[str, Any]],
           command: str) -> None:
    """The report of ``parts`` in ``out``; ``subject``: a Subject, or its setup lines."""
    from attnlab.arena.files import write_atomic
    from attnlab.arena.report import write_document
    from attnlab.heads.analysis import model_lines
    from attnlab.machine import describe, machine, provenance

    me = provenance()
    lines = subject if isinstance(subject, list) else model_lines(subject)
    setup = [*lines, f"command: `{command}`",
             f"machine: {describe(machine())}",
             f"attnlab {me['attnlab']} (commit {me['commit']}), {me['date']}"]
    sections, images, numbers = [], {}, {}
    for name, (n, s, i) in parts:
        sections += s
        images.update(i)
        numbers[name] = n
    md, page = write_document(out, title, setup, sections, images)
    write_atomic(out / "results.json", json.dumps({"setup": setup, **numbers}, indent=1))
    for heading, section in sections:
        for kind, content in section:
            if kind == "list" and (heading.startswith("Summary") or
                                   heading.startswith("Pruning curves")):
                for line in content:
                    console.print(escape(line))
    console.print(f"report: {md} and {page} (numbers: {out / 'results.json'})")


def _options(f: Callable) -> Callable:
    f = click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/MODEL/"
                     "COMMAND].")(f)
    f = click.option("--store", default=DEFAULT_STORE, show_default=True,
                     help="Result store the run keys refer to.")(f)
    return click.option("--model", required=True, help=MODEL_HELP)(f)


def _out(out: str | None, model: str, command: str) -> Path:
    return Path(out) if out else Path(DEFAULT_REPORTS) / "heads" / _slug(model) / command


@click.group("heads", context_settings={"help_option_names": ["-h", "--help"]})
def heads() -> None:
    """The microscope: capture, importance, pruning, sinks and patterns of attention heads.

    \b
    Examples:
      attnlab heads report --model minilm
      attnlab heads importance --model 3f2a9c1e --store attnlab-runs
    """


@heads.command("capture")
@_options
@click.option("--points", default="", help="Hook points to list with their shapes, "
              "comma-separated (e.g. L0.weights,L0.q); statistics are always computed.")
def capture_cmd(model: str, store: str, out: str | None, points: str) -> None:
    """Mean attention maps, entropy and distance of every head.

    \b
    Example:
      attnlab heads capture --model minilm --points L0.weights,L5.heads
    """
    import torch

    from attnlab.heads.analysis import capture_analysis
    from attnlab.heads.capture import capture

    subject = _subject(model, store)
    names = [p.strip() for p in points.split(",") if p.strip()]
    if names:
        run = subject.inputs[0][0]
        try:
            with torch.no_grad(), capture(subject.model, names) as cap:
                run()
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        console.print(escape(cap.describe()))
    result = _run("attention statistics", len(subject.inputs),
                  lambda tick: capture_analysis(subject, tick))
    _write(_out(out, model, "capture"), f"Heads of {subject.name}: attention maps", subject,
           [("capture", result)], f"attnlab heads capture --model {model}")


@heads.command("importance")
@_options
def importance_cmd(model: str, store: str, out: str | None) -> None:
    """Head importance (Michel et al.) next to single-head ablation, rank-correlated.

    \b
    Example:
      attnlab heads importance --model minilm
    """
    from attnlab.heads.analysis import importance_analysis
    from attnlab.heads.sites import sites

    subject = _subject(model, store)
    count = sum(s.heads for s in sites(subject.model))
    result = _run("importance, then ablations", len(subject.losses) + count,
                  lambda tick: importance_analysis(subject, tick))
    _write(_out(out, model, "importance"), f"Heads of {subject.name}: importance", subject,
           [("importance", result)], f"attnlab heads importance --model {model}")


@heads.command("prune")
@_options
@click.option("--step", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.1,
              show_default=True, help="Fraction of all heads pruned per step.")
@click.option("--floor", type=float, default=0.9, show_default=True,
              help="Report how many heads go before the metric drops below this.")
@click.option("--seeds", type=click.IntRange(0), default=3, show_default=True,
              help="Random orders to compare with (seeds 0, 1, ...).")
def prune_cmd(model: str, store: str, out: str | None, step: float, floor: float,
              seeds: int) -> None:
    """Iterative pruning curves: importance order against a random order.

    \b
    Example:
      attnlab heads prune --model minilm --step 0.05 --floor 0.9
    """
    from attnlab.heads.analysis import pruning_analysis
    from attnlab.heads.importance import pruning_steps

    subject = _subject(model, store)
    steps = pruning_steps(subject.model, step)
    result = _run("pruning (importance, random)", (1 + seeds) * steps,
                  lambda tick: pruning_analysis(subject, step, floor, seeds, tick))
    _write(_out(out, model, "prune"), f"Heads of {subject.name}: pruning", subject,
           [("prune", result)], f"attnlab heads prune --model {model} --step {step} "
           f"--floor {floor} --seeds {seeds}")


@heads.command("sinks")
@_options
@click.option("--threshold", type=float, default=0.3, show_default=True,
              help="Sink score above which a head is a sink head.")
def sinks_cmd(model: str, store: str, out: str | None, threshold: float) -> None:
    """Sink heads (Gu et al.'s score on the first token), mass on special tokens, and sink
    tokens from massive activations.

    \b
    Example:
      attnlab heads sinks --model minilm --threshold 0.3
    """
    from attnlab.heads.analysis import sinks_analysis

    subject = _subject(model, store)
    result = _run("attention statistics", len(subject.inputs),
                  lambda tick: sinks_analysis(subject, threshold, tick))
    _write(_out(out, model, "sinks"), f"Heads of {subject.name}: sinks", subject,
           [("sinks", result)], f"attnlab heads sinks --model {model} --threshold "
           f"{threshold}")


@heads.command("patterns")
@_options
@click.option("--clusters", type=click.IntRange(1), default=None,
              help="Number of clusters of heads [default: chosen by silhouette score].")
def patterns_cmd(model: str, store: str, out: str | None, clusters: int | None) -> None:
    """Attention strength against distance, and heads clustered by attention pattern ("How
    Does Attention Work in Vision Transformers?"), next to each head's importance (the
    metric's drop when it alone is zeroed). On a ViT run, distances are between patches.

    \b
    Example:
      attnlab heads patterns --model 3f2a9c1e --store attnlab-runs --clusters 4
    """
    from attnlab.heads.analysis import spatial_analysis, statistics
    from attnlab.heads.importance import ablation_scores
    from attnlab.heads.sites import sites

    subject = _subject(model, store)

    def work(tick: Callable[[], None]) -> Any:
        stats = statistics(subject, tick)
        _, change = ablation_scores(subject.model, subject.metric, progress=tick)
        return _usage_errors(lambda: spatial_analysis(
            subject, stats, -change, clusters, importance_name=drop_name(subject)))

    count = sum(s.heads for s in sites(subject.model))
    result = _run("statistics, ablations", len(subject.inputs) + count, work)
    _write(_out(out, model, "patterns"), f"Heads of {subject.name}: attention patterns",
           subject, [("patterns", result)], f"attnlab heads patterns --model {model}" +
           ("" if clusters is None else f" --clusters {clusters}"))


def drop_name(subject: Any) -> str:
    return (f"the drop of the metric ({subject.metric_name}) when the head alone is zeroed "
            "(the paper's pruning-based importance)")


def _usage_errors(work: Callable[[], Any]) -> Any:
    try:
        return work()
    except ValueError as err:
        raise click.UsageError(str(err)) from None


@heads.command("report")
@_options
@click.option("--step", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.1,
              show_default=True, help="Pruning step (fraction of all heads).")
@click.option("--floor", type=float, default=0.9, show_default=True)
def report_cmd(model: str, store: str, out: str | None, step: float, floor: float) -> None:
    """Everything on one page: maps, importance, pruning, sinks, patterns.

    \b
    Example:
      attnlab heads report --model minilm --out docs/results/heads-minilm
    """
    from attnlab.heads import analysis
    from attnlab.heads.importance import pruning_steps
    from attnlab.heads.sites import sites

    subject = _subject(model, store)
    count = sum(s.heads for s in sites(subject.model))
    total = len(subject.inputs) + len(subject.losses) + count + \
        4 * pruning_steps(subject.model, step)

    def work(tick: Callable[[], None]) -> list[tuple[str, Any]]:
        import torch

        stats = analysis.statistics(subject, tick)  # for the maps, sinks and patterns alike
        importance = analysis.importance_analysis(subject, tick)
        drop = -torch.tensor(importance[0]["ablation_change"])
        return [("capture", analysis.capture_analysis(subject, stats=stats)),
                ("importance", importance),
                ("prune", analysis.pruning_analysis(subject, step, floor, 3, tick)),
                ("sinks", analysis.sinks_analysis(subject, 0.3, stats=stats)),
                ("patterns", _usage_errors(
                    lambda: analysis.spatial_analysis(subject, stats, drop,
                                                      importance_name=drop_name(subject))))]

    parts = _run("heads report", total, work)
    _write(_out(out, model, "report"), f"Heads of {subject.name}", subject, parts,
           f"attnlab heads report --model {model} --step {step} --floor {floor}")


@heads.command("circuit")
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="Result store holding the sweep's runs (with saved models).")
@click.option("--sweep", default="icl_regression", show_default=True,
              help="Sweep of one-layer softmax ICLRegressor runs (task icl_regression).")
@click.option("--example", default=None, help="Contestant label for the per-head table "
              "[default: the one with most heads].")
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/SWEEP/circuit].")
def circuit_cmd(store: str, sweep: str, example: str | None, out: str | None) -> None:
    """The in-context regression circuit ("In-Context Linear Regression Demystified"):
    per-head KQ and OV blocks of every trained softmax ICLRegressor of a sweep, how close
    they are to KQ = omega I and OV = mu e_y e_y^T, whether sum mu ~ 0, and the model against
    the debiased-GD formula built from omega and mu; the control is each model at its
    initialisation, with 95% intervals over seeds.

    \b
    Example:
      attnlab arena run --config docs/results/icl_regression.toml --store runs
      attnlab heads circuit --store runs --sweep icl_regression
    """
    from attnlab.heads.studies.circuits import circuit_study

    lines = [f"sweep {sweep} of {store}/: every finished one-layer softmax run with a saved "
             "model; test episodes at the training context length (2,048, the task's fixed "
             "test stream)"]
    _study(store, [sweep], "circuit", out, f"In-context regression circuits: {sweep}", lines,
           lambda tick: circuit_study(store, sweep, tick, example),
           f"attnlab heads circuit --store {store} --sweep {sweep}" +
           (f" --example {example}" if example else ""))


def _study(store: str, sweeps: list[str], name: str, out: str | None, title: str,
           lines: list[str], work: Callable[[Callable[[], None]], Any], command: str) -> None:
    """Run a study over the stored runs of ``sweeps`` and write its report."""
    from attnlab.arena.store import DB_NAME, RunStore

    if not (Path(store) / DB_NAME).exists():
        raise click.UsageError(f"no result store at {store}/")
    with RunStore(store, readonly=True) as db:
        count = sum(len(db.rows(s)) for s in sweeps)
    result = _run(name, count, lambda tick: _usage_errors(lambda: work(tick)))
    target = Path(out) if out else Path(DEFAULT_REPORTS) / "heads" / _slug(sweeps[0]) / name
    _write(target, title, lines, [(name, result)], command)


@heads.command("induction")
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="Result store holding the sweep's induction runs (with saved models).")
@click.option("--sweep", default="heads_induction", show_default=True,
              help="Sweep of two-layer attention-only runs on the induction task.")
@click.option("--batches", type=click.IntRange(1), default=4, show_default=True,
              help="Held-out batches per seed.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Sequences per batch.")
@click.option("--ig-steps", type=click.IntRange(1), default=16, show_default=True,
              help="Gradient points per layer of attribution patching with integrated "
                   "gradients (1: plain attribution patching only).")
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/SWEEP/induction].")
def induction_cmd(store: str, sweep: str, batches: int, batch_size: int, ig_steps: int,
                  out: str | None) -> None:
    """The known-answer experiment: in two-layer attention-only models trained on the
    induction task, the previous-token head (layer 0) and the induction head (layer 1) read
    off the attention patterns, against the heads that activation patching, attribution
    patching (AtP, and AtP with integrated gradients over --ig-steps points) and path
    patching rank first, against the other heads of each layer and a random head, with 95%
    intervals over seeds.

    \b
    Example:
      attnlab arena run --config docs/results/heads_induction.toml --store runs
      attnlab heads induction --store runs --out docs/results/heads-induction
    """
    from attnlab.heads.studies.induction import induction_study

    lines = [f"sweep {sweep} of {store}/: every finished run with a saved model; held-out "
             f"sequences of the task's test split, {batches} batches of {batch_size} per seed; "
             f"attribution patching with integrated gradients over {ig_steps} points per layer"
             + (" (1: not run)" if ig_steps == 1 else "")]
    _study(store, [sweep], "induction", out, f"Induction heads, the known answer: {sweep}",
           lines, lambda tick: induction_study(store, sweep, batches=batches,
                                               batch_size=batch_size, tick=tick,
                                               ig_steps=ig_steps),
           f"attnlab heads induction --store {store} --sweep {sweep} --batches {batches} "
           f"--batch-size {batch_size} --ig-steps {ig_steps}")


@heads.command("guidance")
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="Result store holding the sweep's digits (ViT) runs.")
@click.option("--sweep", default="vit_digits", show_default=True)
@click.option("--count", type=click.IntRange(1), default=4, show_default=True,
              help="Heads HeadHunter chooses.")
@click.option("--strength", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="SoftPAG strength u (1 = PAG: the map replaced by the identity).")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Guidance scale s in f + s (f - f_perturbed).")
@click.option("--draws", type=click.IntRange(1), default=10, show_default=True,
              help="Random head sets of the control.")
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/SWEEP/guidance].")
def guidance_cmd(store: str, sweep: str, count: int, strength: float, scale: float,
                 draws: int, out: str | None) -> None:
    """Perturbation guidance with HeadHunter ("Fine-Grained Perturbation Guidance via
    Attention Head Selection") on trained ViT classifiers: guided logits f + s (f -
    f_perturbed), heads chosen greedily for the true class's log-probability on validation
    images, measured on test images against the same guidance through random heads.

    \b
    Example:
      attnlab arena run --config docs/results/vit_digits.toml --store runs
      attnlab heads guidance --store runs --sweep vit_digits --count 4
    """
    from attnlab.heads.studies.guidance import guidance_study

    lines = [f"sweep {sweep} of {store}/: every finished digits run with a saved model"]
    _study(store, [sweep], "guidance", out, f"Perturbation guidance with HeadHunter: {sweep}",
           lines, lambda tick: guidance_study(store, sweep, count, strength, scale, draws,
                                              tick=tick),
           f"attnlab heads guidance --store {store} --sweep {sweep} --count {count} "
           f"--strength {strength} --scale {scale} --draws {draws}")


@heads.command("supervision")
@click.option("--store", default=DEFAULT_STORE, show_default=True)
@click.option("--sweep", default="attention_supervision", show_default=True,
              help="Sweep trained with [train.supervise].")
@click.option("--control", default="attention_supervision_control", show_default=True,
              help="The same sweep without the supervision loss.")
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/SWEEP/"
              "supervision].")
def supervision_cmd(store: str, sweep: str, control: str, out: str | None) -> None:
    """Attention supervision (MultiCrafter): the supervised heads' attention on their target
    keys, and the task metrics, against the same runs trained without the loss.

    \b
    Example:
      attnlab arena run --config docs/results/attention_supervision.toml --store runs
      attnlab arena run --config docs/results/attention_supervision_control.toml --store runs
      attnlab heads supervision --store runs
    """
    from attnlab.heads.studies.supervision import supervision_study

    lines = [f"sweeps {sweep} (supervised) and {control} (control) of {store}/, paired by "
             "seed"]
    _study(store, [sweep, control], "supervision", out, f"Attention supervision: {sweep}",
           lines, lambda tick: supervision_study(store, sweep, control, tick),
           f"attnlab heads supervision --store {store} --sweep {sweep} --control {control}")


@heads.command("inject")
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="Result store holding the sweep's icl_maps runs.")
@click.option("--sweep", default="icl_maps", show_default=True)
@click.option("--few-shots", default="1,2,4", show_default=True,
              help="Comma-separated k: k-shot prompting against injection of embeddings "
              "averaged over k-shot prompts.")
@click.option("--prompts", type=click.IntRange(1), default=64, show_default=True,
              help="Few-shot prompts averaged per task embedding.")
@click.option("--steps", type=click.IntRange(0), default=100, show_default=True,
              help="Adam steps learning the mixing weights.")
@click.option("--draws", type=click.IntRange(1), default=4, show_default=True,
              help="Demonstration sets per item of the k-shot baselines.")
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/SWEEP/inject].")
def inject_cmd(store: str, sweep: str, few_shots: str, prompts: int, steps: int,
               draws: int, out: str | None) -> None:
    """Soft injection of task embeddings ("Soft Injection of Task Embeddings Outperforms
    Prompt-Based In-Context Learning") on TransformerLMs trained on icl_maps: zero-shot
    prompts with each map's task embedding mixed into the heads (per-head weights learned
    on a few examples), against zero-shot and k-shot prompting with the same k.

    \b
    Example:
      attnlab arena run --config docs/results/icl_maps.toml --store runs
      attnlab heads inject --store runs --sweep icl_maps
    """
    from attnlab.heads.studies.injection import injection_study

    try:
        ks = tuple(int(k) for k in few_shots.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {few_shots!r}",
                                 param_hint="--few-shots") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter("every k must be >= 1", param_hint="--few-shots")
    lines = [f"sweep {sweep} of {store}/: every finished icl_maps run with a saved model"]
    _study(store, [sweep], "inject", out, f"Soft injection of task embeddings: {sweep}",
           lines, lambda tick: injection_study(store, sweep, ks, prompts, draws=draws,
                                               steps=steps, tick=tick),
           f"attnlab heads inject --store {store} --sweep {sweep} --few-shots {few_shots} "
           f"--prompts {prompts} --steps {steps} --draws {draws}")


@heads.command("steer")
@click.option("--count", type=click.IntRange(1, 72), default=8, show_default=True,
              help="Heads each method edits (and each random control set).")
@click.option("--factor", type=float, default=2.0, show_default=True,
              help="VHR: output scale of the most divergent heads.")
@click.option("--amount", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Modulation: share of the mass outside the segment moved onto it.")
@click.option("--share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="VAR: share of the sink tokens' mass moved onto the segment.")
@click.option("--draws", type=click.IntRange(1), default=10, show_default=True,
              help="Random head sets of the control.")
@click.option("--out", help=f"Output folder [default {DEFAULT_REPORTS}/heads/minilm/steer].")
def steer_cmd(count: int, factor: float, amount: float, share: float, draws: int,
              out: str | None) -> None:
    """Make MiniLM rely more on a context segment, three ways, each against random heads:
    VHR (reinforce the heads with the largest head divergence), head modulation toward the
    segment, and VAR (sink attention redistributed onto the segment in the heads that attend
    to it). Inputs: a docstring's first sentence followed by its second (the segment).

    \b
    Example:
      attnlab heads steer --count 8 --out docs/results/heads-steer-minilm
    """
    from attnlab.heads.studies.steering import steering_study

    def work(tick: Callable[[], None]) -> Any:
        try:
            return steering_study(count, factor, amount, share, draws, tick=tick)
        except ImportError as err:
            raise click.UsageError(str(err)) from None

    result = _run("steering", 64 + 3 * draws, lambda tick: _usage_errors(lambda: work(tick)))
    target = Path(out) if out else Path(DEFAULT_REPORTS) / "heads" / "minilm" / "steer"
    _write(target, "Steering MiniLM's heads toward a context segment",
           ["all-MiniLM-L6-v2 (6 layers x 12 heads), standard-library docstring pairs (S1, "
            "S2): 64 to choose heads, the rest held out"], [("steer", result)],
           f"attnlab heads steer --count {count} --factor {factor} --amount {amount} "
           f"--share {share} --draws {draws}")




def _view_model(model: str, store: str, text: str) -> tuple[Any, dict[str, Any], list[str]]:
    """(model, its inputs for one sequence, the token strings) for ``--model``."""
    import torch

    if model == "minilm" or model.startswith("hf:"):
        from attnlab.integrations import hf

        if model == "minilm":
            net, tokenizer = hf.load_minilm()
        else:
            transformers = hf.require_transformers()
            hf.register()
            name = model.removeprefix("hf:")
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            net = hf.use_attnlab(transformers.AutoModel.from_pretrained(
                name, attn_implementation=hf.implementation_name("softmax")).eval())
        batch = tokenizer([text], return_tensors="pt")
        return net, dict(batch), tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    from attnlab.heads.runs import load_run

    run = load_run(store, model)
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise click.UsageError("for an arena run, --text is token ids separated by spaces "
                               "(e.g. --text '3 14 15 9 2')") from None
    return run.model, {"x": torch.tensor([ids])}, [str(i) for i in ids]


def _ints(text: str, what: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",") if v.strip()] or None
    except ValueError:
        raise click.UsageError(f"--{what}: comma-separated integers, got {text!r}") from None


@heads.command("view")
@click.option("--model", required=True, help="minilm (all-MiniLM-L6-v2, needs the hf extra), "
              "hf:NAME (a Hugging Face model name or folder, loaded with from_pretrained), "
              "or an arena run key (or its first characters) of --store.")
@click.option("--store", default=DEFAULT_STORE, show_default=True,
              help="Result store the run keys refer to.")
@click.option("--text", required=True, help="The input: a sentence for minilm and hf: "
              "models, token ids separated by spaces for an arena run.")
@click.option("--layers", default="", help="Comma-separated layers [default: all].")
@click.option("--heads", "head_list", default="", help="Comma-separated heads of every "
              "layer [default: all].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help=f"The HTML page [default {DEFAULT_REPORTS}/heads/MODEL/view.html].")
@click.option("--check", is_flag=True, help="Open the page in headless Chromium: a "
              "screenshot beside it (.png); fails on console errors or a blank render.")
def view_cmd(model: str, store: str, text: str, layers: str, head_list: str,
             out: str | None, check: bool) -> None:
    """An attention-pattern page: one self-contained HTML file (layers, a grid of heads,
    click to enlarge, hover a cell or a token).

    \b
    Examples:
      attnlab heads view --model minilm --text "The cat sat on the mat because it was warm."
      attnlab heads view --model 3f2a9c1e --text "5 1 7 3 5" --out view.html --check
    """
    import torch

    from attnlab.heads.capture import capture
    from attnlab.heads.sites import sites
    from attnlab.heads.viewer import attention_page, render_page

    try:
        with console.status(f"loading {escape(model)} ..."):
            net, inputs, tokens = _view_model(model, store, text)
        points = [f"L{s.layer}.weights" for s in sites(net)]
        with torch.no_grad(), capture(net, points) as cap:
            net(inputs["x"]) if set(inputs) == {"x"} else net(**inputs)
        path = Path(out) if out else Path(DEFAULT_REPORTS) / "heads" / _slug(model) / "view.html"
        page = attention_page(cap, tokens, path, layers=_ints(layers, "layers"),
                              heads=_ints(head_list, "heads"), title=f"{model}: {text}")
    except (KeyError, FileNotFoundError, ImportError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise click.UsageError(str(message)) from None
    console.print(f"page: {page} ({page.stat().st_size:,} bytes, {len(tokens)} tokens)")
    if check:
        try:
            result = render_page(page, page.with_suffix(".png"))
        except FileNotFoundError as err:
            raise click.UsageError(str(err)) from None
        problems = result.problems()
        for problem in problems:
            console.print(f"[red]{escape(problem)}[/red]")
        if problems:
            raise click.ClickException(f"the page did not pass in Chromium ({len(problems)} "
                                       "problems)")
        console.print(f"checked in Chromium: screenshot {result.png}")
