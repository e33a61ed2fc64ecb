"""``attnlab.integrations.finetune``: fine-tuning a converted model, in full or with LoRA.

LoRA (through peft) trains only the adapters and the mechanism's new parameters; the merged
model equals the adapter model and the teacher stays the original; distilling the
teacher's logits lowers the KL to it on held-out batches; a resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from attnlab.integrations.convert import (  # noqa: E402
    convert,
    converted_modules,
    new_parameters,
    pretrained_parameters,
)
from attnlab.integrations.distill import past_steps, teacher_mode  # noqa: E402
from attnlab.integrations.finetune import (  # noqa: E402
    _lora_layers,
    _new_parameters,
    distillation_loss,
    finetune,
    lora_parameters,
    merge_lora,
)
from tests.integrations.test_distill import Dies, Interrupted, batches  # noqa: E402
from tests.integrations.tiny import build, inputs, outputs  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402


def held_out_kl(model: nn.Module, teacher: nn.Module, data: list[dict]) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in data:
            out = model(**batch, use_cache=False).logits
            target = teacher(**batch, use_cache=False).logits
            total += float(distillation_loss(out, target, batch["attention_mask"].bool(),
                                             "logits"))
    return total / len(data)


def test_lora_trains_adapters_and_new_parameters_only_and_merges():
    """Llama (whose teacher modules share the pretrained Linear weights) converted to
    Hedgehog, logits distillation from its own kept teacher, LoRA rank 4 on q, k, v, o:
    afterwards only adapters and feature maps differ from before (the pretrained weights,
    the rest of the model and the teacher bitwise equal); merging the adapters gives the
    adapter model's logits (float32 tolerance), leaves plain Linear layers, and the teacher
    is still the original model."""
    pytest.importorskip("peft")
    original = build("Llama")
    model = convert(copy.deepcopy(original), "hedgehog")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = set(_new_parameters(model))
    pretrained = set(pretrained_parameters(model))
    log = finetune(model, batches(4, 0), objective="logits", lora=4, steps=8, lr=1e-2,
                   progress=False)
    assert log.steps == 8 and len(log.losses) == 8 and log.lora == 4
    adapters = lora_parameters(model)
    # convert's lists see through the adapters: the same new parameters, the pretrained ones
    # under peft's names (base_layer), no adapter in either
    assert set(new_parameters(model)) == new
    assert {n.replace(".base_layer.", ".") for n in pretrained_parameters(model)} == pretrained
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in adapters.items())
    after = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()
             if n not in adapters}
    assert set(after) == set(before)
    moved = [n for n in before if n not in new and not torch.equal(after[n], before[n])]
    assert not moved, moved
    assert all(not torch.equal(after[n], before[n]) for n in new)
    assert log.trainable == sum(p.numel() for p in adapters.values()) + sum(
        before[n].numel() for n in new)

    ids, mask = inputs()
    with torch.no_grad():
        adapted = outputs(model, ids, mask)
    merge_lora(model)
    assert not _lora_layers(model) and not lora_parameters(model)
    with torch.no_grad():
        merged = outputs(model, ids, mask)
        with teacher_mode(model):
            teacher_out = outputs(model, ids, mask)
        expected = outputs(original, ids, mask)
    real = mask.bool()
    assert_close(merged[real], adapted[real])
    assert_close(teacher_out[real], expected[real])
    assert not torch.equal(merged[real], expected[real])


@pytest.mark.slow
def test_logits_distillation_lowers_the_kl_to_the_teacher():
    """60 steps of logits distillation (LoRA rank 4 + feature maps, lr 1e-2) on 60 batches
    of random tokens lower KL(original || converted) on 4 held-out batches by at least 10%
    (measured: 0.432 -> 0.339, 21%)."""
    pytest.importorskip("peft")
    original = build("GPT-2")
    model = convert(copy.deepcopy(original), "hedgehog")
    held = batches(4, 99)
    before = held_out_kl(model, original, held)
    finetune(model, batches(60, 0), objective="logits", lora=4, steps=60, lr=1e-2,
             progress=False)
    after = held_out_kl(model, original, held)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_hidden_state_distillation_from_a_given_teacher_in_full():
    """BERT (no logits): full fine-tuning on the final hidden states of the unconverted
    model, given as teacher=, lowers the MSE to them on held-out batches; the teacher's own
    parameters do not change."""
    original = build("BERT")
    model = convert(copy.deepcopy(original), "hedgehog")
    held = batches(2, 99)
    frozen = {n: p.detach().clone() for n, p in original.named_parameters()}

    def mse() -> float:
        with torch.no_grad():
            return sum(float(distillation_loss(model(**b).last_hidden_state,
                                               original(**b).last_hidden_state,
                                               b["attention_mask"].bool(), "hidden"))
                       for b in held) / len(held)

    start = mse()
    log = finetune(model, batches(20, 0), objective="hidden", teacher=original, steps=20,
                   lr=1e-3, progress=False)
    assert log.lora is None and log.trainable == sum(p.numel() for p in model.parameters())
    assert mse() < 0.9 * start
    assert all(torch.equal(p, frozen[n]) for n, p in original.named_parameters())


def test_resume_after_a_kill_gives_the_uninterrupted_run(tmp_path):
    """Next-token loss, full fine-tuning of GPT-2 in training mode (dropout), 5 steps over 2
    batches; killed at the 4th batch (checkpoint of step 2) and resumed: bitwise the
    straight run's parameters and losses."""
    data = batches(2, 7)

    def fresh():
        return convert(build("GPT-2"), "hedgehog").train()

    straight = fresh()
    log = finetune(straight, data, objective="lm", steps=5, lr=1e-3, progress=False)
    path = tmp_path / "finetune.pt"
    with pytest.raises(Interrupted):
        finetune(fresh(), Dies(data, 3), objective="lm", steps=5, lr=1e-3, every=2,
                 checkpoint=path, progress=False)
    resumed = fresh()
    again = finetune(resumed, data, objective="lm", steps=5, lr=1e-3, every=2,
                     checkpoint=path, progress=False)
    assert again.resumed_from == 2 and again.losses == log.losses
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    # past the steps asked for: the refusal attention_transfer and attnlab convert hf make
    with pytest.raises(ValueError) as refused:
        finetune(fresh(), data, objective="lm", steps=4, lr=1e-3, checkpoint=path,
                 progress=False)
    assert str(refused.value) == past_steps(path, 5, 4)


def test_refusals():
    data = batches(1, 0)
    model = convert(build("GPT-2"), "hedgehog")
    with pytest.raises(ValueError, match="needs lora"):
        finetune(model, data, objective="logits", progress=False)
    with pytest.raises(ValueError, match="objective must be"):
        finetune(model, data, objective="kl", progress=False)
    with pytest.raises(ValueError, match="lora must be"):
        finetune(model, data, lora=0, progress=False)
    bert = convert(build("BERT"), "hedgehog")
    with pytest.raises(ValueError, match="computes no loss"):
        finetune(bert, data, objective="lm", steps=1, progress=False)
    with pytest.raises(ValueError, match="returns no logits"):
        finetune(bert, data, objective="logits", teacher=build("BERT"), steps=1,
                 progress=False)
    assert len(converted_modules(bert)) == 2
    with pytest.raises(ValueError, match="no converted attention"):
        finetune(build("GPT-2"), data, objective="lm", lora=2, steps=1, progress=False)
