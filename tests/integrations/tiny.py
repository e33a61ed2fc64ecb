"""Tiny random-initialised transformers models (built offline with ``from_config``) for the
``convert`` tests, and the mechanism x architecture table of docs/convert (run
``python -m tests.integrations.tiny`` to print it: every registered mechanism converted onto
every architecture, or the reason it is refused)."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

LENGTH = 10
VOCAB = 97
WINDOW = 12  # Mistral's sliding window: longer than LENGTH (a separate test goes beyond it)
# weights large enough that attention is peaked: a wrong RoPE, a transposed Conv1D or a
# missing bias changes the outputs by far more than rounding
INIT = 0.3
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                initializer_range=INIT)

# name -> (config class, model class, options)
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "BERT": ("BertConfig", "BertModel",
             dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, vocab_size=VOCAB, initializer_range=INIT)),
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel",
              dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, initializer_range=INIT,
                   bos_token_id=1, eos_token_id=2)),
    "Llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER)),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER)),
    "Mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=WINDOW)),
}


def build(name: str, seed: int = 0, **options: Any) -> nn.Module:
    """The tiny model ``name`` (eval mode, float32), its weights drawn after ``seed``."""
    import transformers

    config_cls, model_cls, base = TINY[name]
    config = getattr(transformers, config_cls)(**{**base, **options})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def inputs(batch: int = 3, length: int = LENGTH) -> tuple[Tensor, Tensor]:
    """Token ids and a padding mask: row 0 full, row 1 right-padded, row 2 left-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 3:] = 0
    if batch > 2:
        mask[2, :2] = 0
    return ids, mask


def outputs(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Logits (language models) or the last hidden states (BERT)."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@dataclass(frozen=True)
class Result:
    mechanism: str
    architecture: str
    status: str  # "converted" or "refused"
    detail: str  # the refusal, or how far the output is from the original model's


def check(mechanism: str, architecture: str, **kwargs: Any) -> Result:
    """Convert the tiny ``architecture`` to ``mechanism`` and check it (runs on a padded
    batch, finite on the real tokens, the right shape, gradients reach every new parameter
    through the task loss plus ``extra_loss``, the pretrained q projection copied), or return
    the refusal. An error that is not a ValueError from ``convert`` propagates."""
    from attnlab.integrations.convert import (
        convert,
        converted_modules,
        extra_loss,
        new_parameters,
    )

    model = build(architecture)
    original = copy.deepcopy(model)
    try:
        convert(model, mechanism, **kwargs)
    except ValueError as err:
        return Result(mechanism, architecture, "refused", str(err).partition(": ")[2])
    ids, mask = inputs()
    model.train()  # extra losses (distillation, load balancing) are made in training
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    out = outputs(model, ids, mask)
    with torch.no_grad():
        expected = outputs(original, ids, mask)
    real = mask.bool()
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert torch.isfinite(out[real]).all(), f"{mechanism} on {architecture}: non-finite"
    (out[real].float().pow(2).mean() + extra_loss(model)).backward()
    no_grad = [n for n, p in new_parameters(model).items() if p.grad is None]
    assert not no_grad, f"{mechanism} on {architecture}: no gradient reaches {no_grad}"
    path, first = converted_modules(model)[0]
    q = first.attn.qkv.q.weight
    teacher = first.teacher
    assert teacher is not None
    source = teacher.query.weight if hasattr(teacher, "query") else (
        teacher.c_attn.weight[:, :q.shape[0]].t() if hasattr(teacher, "c_attn")
        else teacher.q_proj.weight)
    assert torch.equal(q, source), f"{mechanism} on {architecture}: q not copied"
    gap = (out - expected)[real].abs().max().item()
    return Result(mechanism, architecture, "converted",
                  f"{len(new_parameters(model))} new tensors, max |diff| {gap:.1e}")


def sweep(mechanisms: Sequence[str] | None = None) -> list[Result]:
    """``check`` every registered mechanism (or ``mechanisms``) on every tiny model."""
    import attnlab as al

    names = list(mechanisms) if mechanisms is not None else al.available()
    return [check(m, arch) for m in names for arch in TINY]


def render(results: Sequence[Result]) -> str:
    """The results as a Markdown table (a row per mechanism) and the reasons below it."""
    archs = list(dict.fromkeys(r.architecture for r in results))
    lines = ["| mechanism | " + " | ".join(archs) + " |",
             "|---" * (len(archs) + 1) + "|"]
    reasons: dict[str, int] = {}
    by_mech: dict[str, dict[str, Result]] = {}
    for r in results:
        by_mech.setdefault(r.mechanism, {})[r.architecture] = r
    for mech, row in by_mech.items():
        cells = []
        for arch in archs:
            r = row[arch]
            if r.status == "converted":
                cells.append(f"yes ({r.detail.split('max |diff| ')[1]})")
            else:
                reason = r.detail.removeprefix(f"{r.mechanism} ")
                n = reasons.setdefault(reason, len(reasons) + 1)
                cells.append(f"no [{n}]")
        lines.append(f"| {mech} | " + " | ".join(cells) + " |")
    lines += [""] + [f"[{n}] {reason}" for reason, n in reasons.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mechanisms", nargs="*", help="default: every registered one")
    args = parser.parse_args(argv)
    print(render(sweep(args.mechanisms or None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
