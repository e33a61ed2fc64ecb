"""Character-level language modelling on Python's own sources (no download), and length
extrapolation on the same data."""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.tasks.base import Evaluation, check_positive, register_task, split_generator
from attnlab.tasks.tokens import TokenTask

# Pure-Python standard-library modules: prose-heavy (docstrings, comments) and present in
# every CPython install. Missing ones are skipped, so the corpus depends on the Python version
# (its size is recorded in every run's metrics).
CORPUS_MODULES = (
    "argparse.py", "textwrap.py", "difflib.py", "inspect.py", "dataclasses.py", "enum.py",
    "functools.py", "random.py", "statistics.py", "fractions.py", "calendar.py", "shutil.py",
    "tempfile.py", "csv.py", "heapq.py", "pprint.py", "ast.py", "tokenize.py", "typing.py",
    "logging/__init__.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py",
    "unittest/case.py", "email/message.py", "http/client.py", "subprocess.py", "threading.py",
)
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII
UNKNOWN = ALPHABET.index("?")
BOS = ALPHABET.index("\n")
TEST_FRACTION = 0.1


@lru_cache(maxsize=1)
def corpus() -> Tensor:
    """The corpus as character ids (int64); tabs become spaces, other characters '?'."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(lib / m).read_text(encoding="utf-8", errors="replace")
             for m in CORPUS_MODULES if (lib / m).is_file()]
    if not texts:
        raise RuntimeError(f"no corpus module found under {lib}")
    text = "\n".join(texts).replace("\t", "    ")
    lookup = torch.full((128,), UNKNOWN, dtype=torch.long)
    for i, ch in enumerate(ALPHABET):
        lookup[ord(ch)] = i
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)
    return lookup[codes.clamp_max(127)]


def split_corpus(split: str) -> Tensor:
    """The first 90% of the corpus trains, the last 10% tests."""
    data = corpus()
    cut = int(len(data) * (1 - TEST_FRACTION))
    return data[:cut] if split == "train" else data[cut:]


def windows(data: Tensor, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` random windows of length + 1 characters."""
    if len(data) <= length + 1:
        raise ValueError(f"corpus split of {len(data)} characters is too short for windows "
                         f"of {length}")
    start = torch.randint(0, len(data) - length - 1, (batch_size, 1), generator=generator)
    return data[start + torch.arange(length + 1)]


@register_task
@dataclass
class CharLM(TokenTask):
    """Next-character prediction on a corpus of CPython's pure-Python standard library.

    Metric: test loss in nats per character (``bpc`` = loss / ln 2 is reported too), and
    the attention on the first token (``first_token_attention``). Slices: loss per quarter of
    the context (how much a longer context helps). ``bos=True`` makes every window start with
    the same token (a newline), like a beginning-of-sequence token.
    """

    length: int = 128
    bos: bool = False

    name: ClassVar[str] = "char_lm"
    metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    slice_axis: ClassVar[str] = "context quarter"
    table_metrics: ClassVar[tuple[str, ...] | None] = ("bpc", "first_token_attention")
    description: ClassVar[str] = "character LM on Python's standard-library sources"
    eval_size: ClassVar[int] = 64
    model_defaults: ClassVar[dict[str, Any]] = {"dim": 96, "depth": 2, "heads": 4}
    train_defaults: ClassVar[dict[str, Any]] = {"steps": 400, "batch_size": 32, "lr": 3e-3}

    def __post_init__(self) -> None:
        check_positive(self.name, length=self.length)

    def vocab_size(self) -> int:
        return len(ALPHABET)

    def max_length(self) -> int:
        return self.length

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train",
               length: int | None = None) -> tuple[Tensor, Tensor]:
        chunk = windows(split_corpus(split), batch_size, length or self.length, generator)
        if self.bos:  # every window starts with the same token, as documents start with BOS
            chunk[:, 0] = BOS
        return chunk[:, :-1], chunk[:, 1:]

    def token_losses(self, model: nn.Module, length: int, seed: int) -> Tensor:
        """Per-position test losses (eval_size, length)."""
        inputs, targets = self.sample(self.eval_size, split_generator(seed, "test"),
                                      split="test", length=length)
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               reduction="none").view_as(targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        losses = self.token_losses(model, self.length, seed)
        quarters = losses.chunk(4, dim=1)
        slices = {f"Q{i + 1}": q.mean().item() for i, q in enumerate(quarters)}
        loss = losses.mean().item()
        metrics = {"loss": loss, "bpc": loss / math.log(2),
                   "corpus_chars": float(len(corpus()))}
        inputs, _ = self.sample(16, split_generator(seed, "test"), split="test")
        metrics.update(first_token_attention(model, inputs))
        return Evaluation(metrics, slices)


def first_token_attention(model: nn.Module, tokens: Tensor) -> dict[str, float]:
    """Mean attention weight on the first token (an attention sink), per layer and overall.

    For queries 2..L (query 1 can only see itself), averaged over heads and batch; layers
    whose mechanism defines no attention matrix are skipped. Keys: ``first_token_attention``
    (mean over layers) and ``first_token_attention_L{i}``.
    """
    blocks = [b for b in getattr(model, "blocks", []) if b.attn.mechanism is None
              or b.attn.mechanism.weights]
    inputs: dict[int, Tensor] = {}
    hooks = [b.attn.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, args[0])) for i, b in enumerate(blocks)]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, block in enumerate(blocks):
        w = block.attn.weights(inputs[i])  # (B, H, L, L)
        out[f"first_token_attention_L{i}"] = w[:, :, 1:, 0].mean().item()
    if out:
        out["first_token_attention"] = sum(out.values()) / len(out)
    return out


@register_task
@dataclass
class LengthExtrapolation(CharLM):
    """Train the character LM at ``length``; test at every multiple in ``multiples``.

    Metric ``loss_max``: test loss at the longest multiple (per-character, nats); slices:
    the loss at each evaluated length. A mechanism that extrapolates keeps the loss of the
    training length (or lowers it: more context) instead of blowing up.
    """

    length: int = 64
    multiples: tuple[int, ...] = (1, 2, 4, 8)

    name: ClassVar[str] = "length_extrapolation"
    metric: ClassVar[str] = "loss_max"
    slice_axis: ClassVar[str] = "test length"
    slice_metric: ClassVar[str | None] = "loss"
    table_metrics: ClassVar[tuple[str, ...] | None] = ("loss_train_length",)
    description: ClassVar[str] = "char LM trained at L, tested at 2L, 4L, 8L"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.multiples = tuple(self.multiples)
        if not self.multiples or min(self.multiples) < 1:
            raise ValueError(f"length_extrapolation: multiples must be >= 1, got "
                             f"{self.multiples}")

    def max_length(self) -> int:
        return self.length * max(self.multiples)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, seed: int) -> Evaluation:
        slices = {}
        for m in self.multiples:
            slices[str(self.length * m)] = self.token_losses(model, self.length * m,
                                                             seed).mean().item()
        first = slices[str(self.length * self.multiples[0])]
        longest = slices[str(self.length * max(self.multiples))]
        return Evaluation({"loss_max": longest, "loss_train_length": first,
                           "corpus_chars": float(len(corpus()))}, slices)
