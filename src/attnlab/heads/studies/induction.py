"""The known-answer experiment: a two-layer attention-only model trained on the induction
task holds a previous-token head in layer 0 and an induction head in layer 1 ("In-context
Learning and Induction Heads"). The heads are read off the attention patterns (the known
answer); activation patching, attribution patching and path patching must then find the
same heads, against the other heads of their layer as the control.

Definitions (held-out sequences of the task, the test split):

- previous-token score of a head: its mean attention weight from position i onto i - 1, over
  every position i >= 1 of every sequence;
- induction score of a head: its mean attention weight from position s + j of the segment's
  second occurrence (starting at s) onto position f + j + 1, the token that followed the same
  token at its first occurrence (starting at f), over the positions j = 0 .. m - 2 at which
  the task asks for a prediction (m: the segment's length);
- the known previous-token head: the layer-0 head of highest previous-token score; the known
  induction head: the layer-1 head of highest induction score. A layer may hold several:
  the previous-token heads are the layer-0 heads with a score of at least ``THRESHOLD`` (more
  than half their attention on the known key, where uniform attention puts 1 / i), the
  induction heads the layer-1 heads likewise (trained on this task alone, every layer-1 head
  may become one).

Patching inputs: clean = the held-out sequences; corrupted = the same sequences with the
segment's FIRST occurrence (its m positions f .. f + m - 1) replaced by tokens drawn uniformly
from the vocabulary's data tokens that are not in the segment, so nothing earlier in the
sequence tells what comes next in the second occurrence. Metric: the logit of the correct
next token at the m - 1 prediction positions of the second occurrence, averaged over them and
the batch. A head's effect is its patching score as a share of the clean - corrupted gap,
signed so that both directions read the same way: denoising (clean head output into the
corrupted run) +1 = the head alone restores the whole gap; noising (corrupted head output
into the clean run) +1 = the head alone destroys all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.arena.stats import fmt, fmt_paired, mean_ci, paired_difference
from attnlab.heads.capture import capture
from attnlab.heads.metrics import Metric
from attnlab.heads.sites import sites
from attnlab.tasks.copying import Induction
from attnlab.tasks.tokens import IGNORE

__all__ = ["InductionBatch", "answer_metric", "corrupt_first_occurrence", "head_effects",
           "induction_batch", "induction_positions", "induction_scores", "induction_study",
           "known_answer", "previous_token_scores"]

Tick = Callable[[], None] | None
DIRECTIONS = ("denoise", "noise")
SIGN = {"denoise": 1.0, "noise": -1.0}  # effect = SIGN x normalised score
IG_STEPS = 16  # integrated-gradients attribution: gradient points per layer
THRESHOLD = 0.5  # a head with at least this score belongs to the known set of its layer
FIRST_DATA_TOKEN = 2  # the induction task's tokens 0 and 1 are special (copying.NOISE, SEP)


# ------------------------------------------------------------------------------ the data
def induction_positions(tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(first, second): per sequence, the start of the segment's first and second occurrence,
    read from an induction batch (``tokens`` and ``targets`` (B, L) of ``Induction.sample``):
    the second occurrence starts at the first position with a target, the first at the first
    position holding the same token (segment tokens occur nowhere else)."""
    if tokens.shape != targets.shape or tokens.dim() != 2:
        raise ValueError(f"tokens and targets must both be (B, L), got {tuple(tokens.shape)} "
                         f"and {tuple(targets.shape)}")
    asked = targets != IGNORE
    if not bool(asked.any(1).all()):
        raise ValueError("every sequence needs at least one target (an induction batch)")
    second = asked.int().argmax(1)  # the first True
    rows = torch.arange(tokens.shape[0])
    same = tokens == tokens[rows, second][:, None]
    first = same.int().argmax(1)
    if bool((first >= second).any()):
        raise ValueError("a segment has no earlier occurrence: not an induction batch")
    return first, second


def corrupt_first_occurrence(tokens: Tensor, first: Tensor, segment: int, vocab: int,
                             generator: torch.Generator) -> Tensor:
    """``tokens`` with positions first .. first + segment - 1 of each sequence replaced by
    tokens drawn uniformly from the data tokens [2, vocab) that are not in that sequence's
    segment (so every replaced position changes, and no segment token is left before the
    second occurrence)."""
    b, length = tokens.shape
    if segment < 1 or bool((first + segment > length).any()) or bool((first < 0).any()):
        raise ValueError(f"the segment (length {segment}) must lie inside the sequences "
                         f"(length {length})")
    offsets = torch.arange(segment)
    where = first[:, None] + offsets  # (B, m)
    seg = tokens.gather(1, where)
    allowed = torch.ones(b, vocab, dtype=torch.bool)
    allowed[:, :FIRST_DATA_TOKEN] = False
    allowed.scatter_(1, seg, False)
    if not bool(allowed.any(1).all()):
        raise ValueError(f"vocab={vocab} leaves no data token outside the segment")
    draws = torch.multinomial(allowed.float(), segment, replacement=True, generator=generator)
    out = tokens.clone()
    out.scatter_(1, where, draws)
    return out


def answer_metric(targets: Tensor, second: Tensor, segment: int) -> Metric:
    """Metric: the mean logit of the correct next token at the prediction positions
    second + j, j = 0 .. segment - 2 (the answers are ``targets`` there)."""
    where = second[:, None] + torch.arange(segment - 1)  # (B, m - 1)
    answers = targets.gather(1, where)
    if bool((answers == IGNORE).any()):
        raise ValueError("a prediction position of the second occurrence has no target")

    def metric(logits: Tensor) -> Tensor:
        if logits.shape[0] != where.shape[0]:
            raise ValueError(f"the metric was built for {where.shape[0]} sequences, got "
                             f"logits of {logits.shape[0]}")
        at = logits.gather(1, where.to(logits.device)[..., None].expand(-1, -1,
                                                                        logits.shape[-1]))
        return at.gather(-1, answers.to(logits.device)[..., None]).mean()
    return metric


@dataclass
class InductionBatch:
    """One batch of held-out induction sequences with everything patching needs."""

    clean: Tensor
    corrupted: Tensor
    targets: Tensor
    first: Tensor
    second: Tensor
    segment: int

    @property
    def metric(self) -> Metric:
        return answer_metric(self.targets, self.second, self.segment)


def induction_batch(task: Induction, size: int, generator: torch.Generator,
                    corruption: torch.Generator) -> InductionBatch:
    """``size`` sequences of ``task`` drawn with ``generator``, corrupted with
    ``corruption`` (see ``corrupt_first_occurrence``)."""
    if not isinstance(task, Induction):
        raise ValueError(f"the known-answer experiment needs the induction task, got "
                         f"{type(task).__name__}")
    tokens, targets = task.sample(size, generator)
    first, second = induction_positions(tokens, targets)
    corrupted = corrupt_first_occurrence(tokens, first, task.segment, task.vocab, corruption)
    return InductionBatch(tokens, corrupted, targets, first, second, task.segment)


# ---------------------------------------------------------------------- the known answer
def previous_token_scores(weights: Tensor) -> Tensor:
    """(H,): each head's mean weight from position i onto i - 1 (i >= 1), ``weights``
    (B, H, L, L)."""
    if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2] or weights.shape[-1] < 2:
        raise ValueError(f"weights must be (B, H, L, L) with L >= 2, got {tuple(weights.shape)}")
    return weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean((0, 2))


def induction_scores(weights: Tensor, first: Tensor, second: Tensor, segment: int) -> Tensor:
    """(H,): each head's mean weight from second + j onto first + j + 1, j = 0 ..
    segment - 2, ``weights`` (B, H, L, L), ``first`` and ``second`` (B,)."""
    if weights.dim() != 4 or weights.shape[0] != first.shape[0]:
        raise ValueError(f"weights must be (B, H, L, L) for the {first.shape[0]} sequences, "
                         f"got {tuple(weights.shape)}")
    b, h = weights.shape[:2]
    j = torch.arange(segment - 1)
    queries = (second[:, None] + j).to(weights.device)  # (B, m - 1)
    keys = (first[:, None] + j + 1).to(weights.device)
    rows = torch.arange(b, device=weights.device)[:, None]
    picked = weights.permute(0, 2, 3, 1)[rows, queries, keys]  # (B, m - 1, H)
    return picked.mean((0, 1))


def known_answer(model: nn.Module, batches: Sequence[InductionBatch],
                 threshold: float = THRESHOLD) -> dict[str, Any]:
    """The scores of every head on the clean sequences, (layers, heads) each:
    ``previous_token`` and ``induction``; ``previous_head`` = the layer-0 head of highest
    previous-token score, ``induction_head`` = the layer-1 head of highest induction score;
    ``previous_heads`` and ``induction_heads``: the heads of those layers whose score is at
    least ``threshold`` (sorted by score, highest first; possibly empty)."""
    model_sites = sites(model)
    if len(model_sites) < 2:
        raise ValueError(f"the induction circuit needs two attention layers; the model has "
                         f"{len(model_sites)}")
    names = [f"L{s.layer}.weights" for s in model_sites]
    prev, ind = [], []
    for batch in batches:
        with torch.no_grad(), capture(model, names) as cap:
            model(batch.clean)
        prev.append(torch.stack([previous_token_scores(cap[n]) for n in names]))
        ind.append(torch.stack([induction_scores(cap[n], batch.first, batch.second,
                                                 batch.segment) for n in names]))
    previous, induction = torch.stack(prev).mean(0), torch.stack(ind).mean(0)

    def above(row: Tensor) -> list[int]:
        return [int(h) for h in row.argsort(descending=True) if row[h] >= threshold]
    return {"previous_token": previous, "induction": induction,
            "previous_head": (0, int(previous[0].argmax())),
            "induction_head": (1, int(induction[1].argmax())),
            "previous_heads": above(previous[0]), "induction_heads": above(induction[1])}


# ----------------------------------------------------------------- patching, attribution
def _attribution() -> Callable[..., Any] | None:
    try:
        from attnlab.heads.attribution import attribution_patching
    except ImportError:
        return None
    return attribution_patching


def _path_scores() -> Callable[..., Any] | None:
    try:
        from attnlab.heads.patching import path_patching_scores
    except ImportError:
        return None
    return path_patching_scores


def head_effects(model: nn.Module, batch: InductionBatch,
                 receivers: Sequence[tuple[int, int]] = (), *, ig_steps: int = IG_STEPS,
                 seconds: dict[str, float] | None = None) -> dict[str, Tensor]:
    """{method name: (layers, heads) effect} on one batch: activation patching, attribution
    patching (AtP) and attribution patching with integrated gradients over ``ig_steps``
    points (when ``attnlab.heads.attribution`` is there; 0 or 1 leaves it out) of each
    head's output (hook point ``heads``), denoising and noising; with ``receivers`` (the
    induction heads), path patching of every layer-0 head into those heads' keys (noising,
    the same sign). The effect is the normalised score times +1 (denoise) or -1 (noise): the
    share of the clean - corrupted gap the head restores or destroys. ``seconds``, when
    given, gains each method's wall time on this batch (added to what it holds)."""
    import time

    from attnlab.heads.patching import activation_patching

    attribution = _attribution()
    out: dict[str, Tensor] = {}
    clock = seconds if seconds is not None else {}

    def timed(name: str, run: Callable[..., Any], **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = run(model, batch.clean, batch.corrupted, batch.metric, **kwargs)
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
        return result

    for direction in DIRECTIONS:
        name = f"activation {direction}"
        act = timed(name, activation_patching, point="heads", direction=direction)
        out[name] = SIGN[direction] * act.normalised().float()
        if attribution is None:
            continue
        runs = [(f"attribution {direction}", 1)]
        if ig_steps > 1:
            runs.append((f"{ig_name(ig_steps)} {direction}", ig_steps))
        for name, steps in runs:
            atp = timed(name, attribution, point="heads", direction=direction,
                        **({"steps": steps} if steps > 1 else {}))
            out[name] = SIGN[direction] * atp.normalised().float()
    path = _path_scores()
    if receivers and path is not None:
        name = "path noise into induction keys"
        scores = timed(name, path, receivers=list(receivers), via="k")
        out[name] = -scores.normalised().float()
    return out


def ig_name(steps: int) -> str:
    """The method name of attribution patching with integrated gradients over ``steps``."""
    return f"attribution IG ({steps} steps)"


ALPHAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def interpolation(model: nn.Module, batch: InductionBatch, head: tuple[int, int | None],
                  alphas: Sequence[float] = ALPHAS) -> list[float]:
    """The metric on the clean sequences with ``head``'s output (hook point ``heads``) set to
    (1 - a) clean + a corrupted, for each a of ``alphas``: how far the metric is from linear
    in the head's output, which is what attribution patching (its slope at a = 0 times the
    whole change) assumes when noising. ``(layer, None)``: every head of the layer moves
    together (the line along which integrated gradients takes its slopes)."""
    from attnlab.heads.sites import forward_hooks

    layer, h = head
    model_sites = sites(model)
    name = f"L{layer}.heads"
    with torch.no_grad():
        with capture(model, [name]) as clean_cap:
            model(batch.clean)
        with capture(model, [name]) as corrupted_cap:
            model(batch.corrupted)
    clean, corrupted = clean_cap[name], corrupted_cap[name]
    out = []
    for a in alphas:
        def mix(_m: nn.Module, _i: Any, value: Tensor, a: float = a) -> Tensor:
            value = value.clone()
            if h is None:
                return (1 - a) * clean + a * corrupted
            value[:, :, h] = (1 - a) * clean[:, :, h] + a * corrupted[:, :, h]
            return value
        with torch.no_grad(), forward_hooks(model_sites, "heads", {layer: mix}):
            out.append(float(batch.metric(model(batch.clean))))
    return out


# --------------------------------------------------------------------------- the study
def _spearman(a: Tensor, b: Tensor) -> float:
    from scipy.stats import spearmanr

    keep = ~(a.isnan() | b.isnan())
    x, y = a[keep], b[keep]
    if len(x) < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return float("nan")  # a constant ranking has no correlation
    return float(spearmanr(x.numpy(), y.numpy()).statistic)


def _head(pair: tuple[int, int]) -> str:
    return f"L{pair[0]}h{pair[1]}"


def _top(effect: Tensor, layer: int) -> int:
    return int(effect[layer].nan_to_num(float("-inf")).argmax())


def _random_head(effect: Tensor) -> float:
    """The expected effect of one head drawn uniformly from the heads the method scores."""
    values = effect[~effect.isnan()]
    return float(values.mean())


def _mean_of(effect: Tensor, layer: int, heads: Sequence[int]) -> float:
    values = [float(effect[layer, h]) for h in heads if not bool(effect[layer, h].isnan())]
    return sum(values) / len(values) if values else float("nan")


def induction_study(store: str | Path, sweep: str, *, batches: int = 4,
                    batch_size: int = 64, tick: Tick = None, ig_steps: int = IG_STEPS
                    ) -> tuple[dict[str, Any], list, dict[str, bytes]]:
    """The known-answer experiment over every finished run of ``sweep`` with a saved model:
    per seed the known heads (from the attention patterns) and the heads each method ranks
    first; the known heads' effects against the other heads of their layer (mean ± 95% CI
    over seeds of the per-seed means over ``batches`` held-out batches of ``batch_size``);
    the rank correlation of attribution (AtP, and AtP with integrated gradients over
    ``ig_steps`` points) and activation patching; each method's wall time per batch."""
    from attnlab.heads.runs import load_run, saved_runs
    from attnlab.tasks.base import split_generator

    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch_size must be >= 1, got {batches}, {batch_size}")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be an integer >= 1 (1: no integrated-gradients "
                         f"method, only plain attribution patching), got {ig_steps!r}")
    rows = sorted(saved_runs(store, sweep), key=lambda r: (r["label"], r["seed"]))
    if not rows:
        raise ValueError(f"no finished run with a saved model in sweep {sweep!r} of {store}/ "
                         "(attnlab arena run --config docs/results/heads_induction.toml)")
    per_seed: dict[int, dict[str, Any]] = {}
    example = None
    for row in rows:
        if row["seed"] in per_seed:
            raise ValueError(f"sweep {sweep!r} has several contestants; the study reads one "
                             f"(seed {row['seed']} occurs twice)")
        run = load_run(store, row["key"])
        data = split_generator(0, "test", stream=1)
        noise = split_generator(0, "test", stream=2)
        drawn = [induction_batch(run.task, batch_size, data, noise) for _ in range(batches)]
        known = known_answer(run.model, drawn)
        receivers = [(1, h) for h in known["induction_heads"]] or [known["induction_head"]]
        seconds: dict[str, float] = {}
        effects = [head_effects(run.model, b, receivers, ig_steps=ig_steps, seconds=seconds)
                   for b in drawn]
        mean = {name: torch.stack([e[name] for e in effects]).mean(0) for name in effects[0]}
        per_seed[row["seed"]] = {"key": row["key"], "metrics": row.get("metrics") or {},
                                 "row": row,
                                 "known": known, "effects": mean,
                                 "clean_corrupted": _gaps(run.model, drawn),
                                 "seconds": {m: t / batches for m, t in seconds.items()}}
        if example is None:
            example = (row, run.model, drawn[0], known)
        if tick:
            tick()
    assert example is not None
    return _report(per_seed, example, batches, batch_size, ig_steps)


def _gaps(model: nn.Module, batches: Sequence[InductionBatch]) -> tuple[float, float]:
    """The metric on the clean and on the corrupted sequences (mean over batches)."""
    with torch.no_grad():
        clean = [float(b.metric(model(b.clean))) for b in batches]
        corrupted = [float(b.metric(model(b.corrupted))) for b in batches]
    return sum(clean) / len(clean), sum(corrupted) / len(corrupted)


def _accuracy(metrics: dict[str, Any]) -> str:
    for key in ("test_accuracy", "accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{metrics[key]:.4f}"
    return "–"


def _recipe(per_seed: dict[int, dict[str, Any]]) -> list[str]:
    """The training recipe of the runs, from the store (the first seed's configuration)."""
    first = per_seed[min(per_seed)]["row"]
    spec = first["config"]
    train = spec["train"]
    times = [per_seed[s]["row"].get("wall_time") for s in sorted(per_seed)]
    lines = [f"task {spec['task']} {spec['task_params']}; mechanism {spec['mechanism']}",
             f"model {spec['model']} ({first.get('params', '?')} parameters)",
             f"training: {train['steps']} steps, batch {train['batch_size']}, AdamW lr "
             f"{train['lr']}, weight decay {train['weight_decay']}, warm-up {train['warmup']}, "
             f"gradient clipping {train['grad_clip']}, {train['dtype']} on {train['device']}; "
             f"seeds {', '.join(str(s) for s in sorted(per_seed))}"]
    if all(isinstance(t, (int, float)) for t in times):
        machine = spec.get("machine", "a machine not recorded")
        lines.append("training time per run: " + ", ".join(f"{t:.0f} s" for t in times) +
                     f" (the stored wall times, on {machine})")
    command = (spec.get("provenance") or {}).get("command")
    if command:
        lines.append(f"trained with `{command}`")
    return lines


KNOWN = ((0, "previous_heads", "previous_head", "previous-token"),
         (1, "induction_heads", "induction_head", "induction"))


def _scores_cell(row: Tensor, chosen: Sequence[int]) -> str:
    return " / ".join(f"**{float(v):.2f}**" if h in chosen else f"{float(v):.2f}"
                      for h, v in enumerate(row))


def _report(per_seed: dict[int, dict[str, Any]], example: tuple, batches: int,
            batch_size: int, ig_steps: int = IG_STEPS
            ) -> tuple[dict[str, Any], list, dict[str, bytes]]:
    seeds = sorted(per_seed)
    n = len(seeds)
    methods = list(per_seed[seeds[0]]["effects"])
    known_rows, top_rows = [], []
    hits = {m: {layer: [0, 0] for layer, *_ in KNOWN} for m in methods}
    for seed in seeds:
        s = per_seed[seed]
        k = s["known"]
        clean, corrupted = s["clean_corrupted"]
        known_rows.append([
            str(seed), _accuracy(s["metrics"]),
            _scores_cell(k["previous_token"][0], k["previous_heads"]),
            ", ".join(_head((0, h)) for h in k["previous_heads"]) or "none",
            _scores_cell(k["induction"][1], k["induction_heads"]),
            ", ".join(_head((1, h)) for h in k["induction_heads"]) or "none",
            f"{clean:.2f} / {corrupted:.2f}"])
        cells = [str(seed)]
        for m in methods:
            parts = []
            for layer, many, one, _ in KNOWN:
                if m.startswith("path") and layer == 1:
                    continue  # path patching scores the senders of layer 0 only
                top = _top(s["effects"][m], layer)
                inside, best = top in k[many], top == k[one][1]
                hits[m][layer][0] += inside
                hits[m][layer][1] += best
                parts.append(f"{_head((layer, top))} {'✓' if inside else '✗'}")
            cells.append(", ".join(parts))
        top_rows.append(cells)
    control_rows = []
    for m in methods:
        for layer, many, _, what in KNOWN:
            if m.startswith("path") and layer == 1:
                continue
            mine: dict[int, float] = {}
            rest: dict[int, float] = {}
            anyhead: dict[int, float] = {}
            for seed in seeds:
                effect, chosen = per_seed[seed]["effects"][m], per_seed[seed]["known"][many]
                others = [h for h in range(effect.shape[1]) if h not in chosen]
                if chosen:
                    mine[seed] = _mean_of(effect, layer, chosen)
                    anyhead[seed] = _random_head(effect)
                if chosen and others:
                    rest[seed] = _mean_of(effect, layer, others)
            control_rows.append([
                m, f"{what} heads (L{layer})", fmt(*mean_ci(list(mine.values())), 3),
                fmt(*mean_ci(list(rest.values())), 3) if rest else
                "– (every head of the layer is one)",
                fmt_paired(paired_difference(mine, rest)) if rest else "–",
                fmt(*mean_ci(list(anyhead.values())), 3),
                fmt_paired(paired_difference(mine, anyhead))])
    numbers: dict[str, Any] = {"seeds": {}, "batches": batches, "batch_size": batch_size,
                               "threshold": THRESHOLD, "ig_steps": ig_steps}
    corr_rows = []
    for a in methods:
        if not a.startswith("attribution"):
            continue
        direction = a.rsplit(" ", 1)[1]
        b = f"activation {direction}"
        rhos = {seed: _spearman(per_seed[seed]["effects"][a].flatten(),
                                per_seed[seed]["effects"][b].flatten()) for seed in seeds}
        corr_rows.append([a, fmt(*mean_ci(list(rhos.values())), 3),
                          ", ".join(f"{rhos[s]:+.2f}" for s in seeds)])
        # "spearman": {direction: ...} for AtP as before; the others under their name
        key = direction if a == f"attribution {direction}" else a
        numbers.setdefault("spearman", {})[key] = rhos
    cost_rows = [[m, fmt(*mean_ci([per_seed[seed]["seconds"][m] for seed in seeds]), 3)]
                 for m in methods if all(m in per_seed[seed]["seconds"] for seed in seeds)]
    numbers["seconds_per_batch"] = {m: {str(seed): per_seed[seed]["seconds"].get(m)
                                        for seed in seeds} for m in methods}
    for seed in seeds:
        s = per_seed[seed]
        k = s["known"]
        numbers["seeds"][str(seed)] = {
            "key": s["key"], "previous_head": list(k["previous_head"]),
            "induction_head": list(k["induction_head"]),
            "previous_heads": k["previous_heads"], "induction_heads": k["induction_heads"],
            "previous_token_scores": k["previous_token"].tolist(),
            "induction_scores": k["induction"].tolist(),
            "clean_metric": s["clean_corrupted"][0], "corrupted_metric": s["clean_corrupted"][1],
            "effects": {m: s["effects"][m].tolist() for m in methods}}
    summary = [
        "previous-token heads (layer 0, score ≥ 0.5) per seed: " + "; ".join(
            f"seed {seed}: " + (", ".join(_head((0, h)) for h in
                                          per_seed[seed]["known"]["previous_heads"]) or "none")
            for seed in seeds),
        "induction heads (layer 1, score ≥ 0.5) per seed: " + "; ".join(
            f"seed {seed}: " + (", ".join(_head((1, h)) for h in
                                          per_seed[seed]["known"]["induction_heads"]) or "none")
            for seed in seeds)]
    for layer, many, _, what in KNOWN:
        full = sum(len(per_seed[seed]["known"][many]) ==
                   per_seed[seed]["known"]["previous_token"].shape[1] for seed in seeds)
        if full:
            article = "an" if what[0] in "aeiou" else "a"
            summary.append(f"every layer-{layer} head is {article} {what} head in {full}/{n} "
                           "seeds: "
                           f"there the layer-{layer} check cannot fail, and the heads of the "
                           "layer have no other head to be compared with")
    for m in methods:
        line = (f"{m}: the top layer-0 head is a previous-token head in {hits[m][0][0]}/{n} "
                f"seeds (the highest-scoring one in {hits[m][0][1]}/{n})")
        if not m.startswith("path"):
            line += (f"; the top layer-1 head is an induction head in {hits[m][1][0]}/{n} "
                     f"(the highest-scoring one in {hits[m][1][1]}/{n})")
        summary.append(line)
    if not any(m.startswith("attribution") for m in methods):
        summary.append("attribution patching: attnlab.heads.attribution is not available in "
                       "this attnlab, so it was not run")
    definitions = [
        "previous-token score: a head's mean attention weight from position i onto i - 1 "
        "(every i ≥ 1); induction score: its mean weight from position s + j of the "
        "segment's second occurrence onto f + j + 1, the token after the same token's first "
        "occurrence (j = 0 .. m - 2, the prediction positions); the known heads: the heads "
        f"of layer 0 (previous-token) and layer 1 (induction) scoring ≥ {THRESHOLD} (in "
        "bold below); the highest-scoring one of each layer is the single known head",
        "clean: held-out sequences of the task (test split, stream 1); corrupted: the same "
        "with the segment's first occurrence (all m positions) replaced by random data tokens "
        "not in the segment; metric: the logit of the correct next token at the m - 1 "
        "prediction positions of the second occurrence, averaged",
        "effect: the patching score of the head's output (hook point heads) as a share of the "
        "clean - corrupted gap, signed so that +1 = the head alone restores the whole gap "
        "(denoise: clean output into the corrupted run) or destroys it (noise: corrupted "
        "output into the clean run); path noise into induction keys: path patching of each "
        "layer-0 head into the keys of the induction heads only (the other heads frozen)",
        "expected: noising and path patching find the previous-token head; denoising cannot, "
        "by construction: its clean output tells the induction head where the segment's "
        "tokens were, but the tokens it would then copy are the corrupted ones",
        f"{batches} batches of {batch_size} sequences per seed; intervals: mean ± 95% "
        "t-interval over seeds of the per-seed means over batches (arena.stats); controls, "
        "paired by seed: the mean of the other heads of the same layer, and a random head "
        "of the model (the expected effect of one head drawn uniformly as "
        "heads.selection.random_heads draws: the mean over every head that has a score)",
        (f"attribution patching with integrated gradients: {ig_steps} gradient points per "
         f"layer (--ig-steps {ig_steps}; the method {ig_name(ig_steps)!r})" if ig_steps > 1
         else "attribution patching with integrated gradients: not run (--ig-steps 1: plain "
         "attribution patching only)")]
    sections: list = [
        ("Summary", [("list", summary)]),
        ("Recipe", [("list", _recipe(per_seed))]),
        ("Definitions", [("list", definitions)]),
        ("The known answer per seed (from the attention patterns)", [("table", (
            ["seed", "test accuracy", "previous-token score, L0 h0 / h1 / ...",
             "previous-token heads", "induction score, L1 h0 / h1 / ...", "induction heads",
             "metric clean / corrupted"], known_rows))]),
        ("The head each method ranks first (layer 0, layer 1; ✓ = one of the known heads)",
         [("table", (["seed", *methods], top_rows))]),
        ("Known heads against the other heads of their layer (effect, mean ± 95% CI over "
         "seeds; difference paired by seed [95% CI])", [("table", (
             ["method", "known heads", "known heads' effect", "other heads of the layer",
              "known - others", "random head", "known - random"], control_rows))])]
    if corr_rows:
        sections.append(("Rank correlation of attribution and activation patching (Spearman "
                         "over every head, per seed, against activation patching in the same "
                         "direction)", [("table", (
                             ["method", "mean ± 95% CI", "per seed"], corr_rows))]))
    if cost_rows:
        sections.append((f"Cost (wall seconds per batch of {batch_size}, mean ± 95% CI over "
                         "seeds, on the machine named above)", [("table", (
                             ["method", "seconds per batch"], cost_rows))]))
    row, model, batch, known = example
    if any(m.startswith("attribution") for m in methods):
        curve_rows = []
        for layer, many, one, what in KNOWN:
            head = (layer, known[many][0]) if known[many] else known[one]
            curve = interpolation(model, batch, head)
            curve_rows.append([f"{_head(head)} ({what})",
                               *(f"{v:.2f}" for v in curve)])
            numbers.setdefault("interpolation", {})[_head(head)] = curve
        for layer, *_ in KNOWN:
            curve = interpolation(model, batch, (layer, None))
            curve_rows.append([f"every head of layer {layer} together",
                               *(f"{v:.2f}" for v in curve)])
            numbers.setdefault("interpolation", {})[f"L{layer}"] = curve
        sections.append((
            f"Why attribution misses when noising (seed {row['seed']}, one batch)", [
                ("list", ["the metric on the clean sequences with one known head's output "
                          "set to (1 - a) clean + a corrupted (a = 1 is activation "
                          "patching's noising run): attribution patching extrapolates the "
                          "slope at a = 0 to a = 1, so where the curve is flat at a = 0 and "
                          "falls later it predicts almost nothing (the failure AtP* of "
                          "Kramár et al., 2024, attributes to saturated attention); "
                          "attribution with integrated gradients averages the slope at "
                          "a = k / m (k = 0 .. m - 1) on the line along which every head of "
                          "the layer moves together (heads.attribution, steps=m), so a fall "
                          "later on the line counts (the last rows: that line, every head of "
                          "the layer set to (1 - a) clean + a corrupted)"]),
                ("table", (["head", *(f"a = {a:g}" for a in ALPHAS)], curve_rows))]))
    images = _figures(per_seed, example, methods)
    if images:
        sections.append((f"Seed {example[0]['seed']}", [("image", name) for name in images]))
    return numbers, sections, images


def _figures(per_seed: dict[int, dict[str, Any]], example: tuple, methods: list[str]
             ) -> dict[str, bytes]:
    from attnlab.heads import figures

    row, model, batch, known = example
    seed = row["seed"]
    images: dict[str, bytes] = {}
    prev, ind = known["previous_head"], known["induction_head"]
    names = [f"L{prev[0]}.weights", f"L{ind[0]}.weights"]
    with torch.no_grad(), capture(model, names) as cap:
        model(batch.clean[:1])
    maps = torch.stack([cap[names[0]][0, prev[1]], cap[names[1]][0, ind[1]]])
    f, s = int(batch.first[0]), int(batch.second[0])
    images["patterns"] = figures.pattern_panels(
        maps, [f"{_head(prev)} previous-token", f"{_head(ind)} induction"],
        f"seed {seed}, one held-out sequence (segment at {f} and {s})")
    heatmap = _heatmap()
    for m in methods:
        if m.startswith("path"):
            continue
        effect = per_seed[seed]["effects"][m]
        title = f"seed {seed}: {m} (signed: +1 = the whole gap)"
        slug = m.replace("IG (", "ig").replace(" steps)", "").replace(" ", "_")
        images[slug] = heatmap(effect, title)
    return images


def _heatmap() -> Callable[[Tensor, str], bytes]:
    """(layers, heads) effects -> PNG bytes: ``heads.patching_figures.patching_heatmap`` where
    this attnlab has it, else ``heads.figures.head_heatmap``."""
    from attnlab.heads import figures

    try:
        from attnlab.heads.patching_figures import patching_heatmap
    except ImportError:
        return lambda scores, title: figures.head_heatmap(scores, title, "effect")

    def draw(scores: Tensor, title: str) -> bytes:
        import tempfile

        from attnlab.heads.metrics import PatchScores

        # the effects are already shares of the gap (a gap of 1 leaves them as they are)
        wrapped = PatchScores(scores.double(), ("layer", "head"), "heads", "effect", "",
                              1.0, 0.0)
        with tempfile.TemporaryDirectory() as folder:
            path = patching_heatmap(wrapped, Path(folder) / "map.png", normalised=True,
                                    title=title)
            return Path(path).read_bytes()
    return draw
