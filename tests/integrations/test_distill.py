"""``attnlab.integrations.distill``: attention transfer on tiny offline transformers models.

The Hedgehog loss falls and the student's weights approach the teacher's on held-out
batches; the LoLCATs loss falls for a mechanism whose weights do not give its output; only
the new parameters change; each layer learns from the frozen model's hidden states (checked
against the unconverted model's own eager attention weights); an interrupted run resumed
from its checkpoint ends bitwise where an uninterrupted run does.
"""

from __future__ import annotations

import copy
import dataclasses

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
from attnlab.integrations.distill import (  # noqa: E402
    _resolve_loss,
    attention_transfer,
    checkpoint_step,
    evaluate_transfer,
    loss_refusal,
    past_steps,
    teacher_mode,
)
from tests.integrations.tiny import VOCAB, build, inputs, outputs  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402


def batches(count: int, seed: int, batch: int = 4, length: int = 16) -> list[dict]:
    """Random token batches; the last row of each is right-padded by 3 tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length - 3:] = 0
        out.append({"input_ids": torch.randint(3, VOCAB, (batch, length), generator=gen),
                    "attention_mask": mask})
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the model and of its kept teacher modules, copied."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for path, module in converted_modules(model):
        for name, p in module.teacher.named_parameters():
            state[f"{path}.teacher.{name}"] = p.detach().clone()
    return state


def assert_only_new_changed(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    new = set(new_parameters(model))
    after = snapshot(model)
    unchanged = [n for n in new if torch.equal(after[n], before[n])]
    assert not unchanged, f"new parameters that did not train: {unchanged}"
    moved = [n for n in before if n not in new and not torch.equal(after[n], before[n])]
    assert not moved, f"parameters outside the new ones changed: {moved}"


@pytest.mark.parametrize("arch", ["GPT-2", "BERT"])
def test_hedgehog_loss_falls_and_the_weights_approach_the_teacher(arch):
    """30 steps of the Hedgehog loss on 8 batches of random tokens: on 2 held-out batches
    KL(teacher || student) of every layer falls by at least 15% (measured: 24% and 39% on
    GPT-2, 34% and 46% on BERT), the cross-entropy with it; only the feature maps change
    (pretrained projections, the rest of the model and the teacher modules bitwise equal)."""
    model = convert(build(arch), "hedgehog")
    train, held = batches(8, 0), batches(2, 99)
    kl_before = evaluate_transfer(model, held, kl=True)
    ce_before = evaluate_transfer(model, held)
    before = snapshot(model)
    log = attention_transfer(model, train, steps=30, progress=False)
    assert log.loss == "hedgehog" and log.steps == 30 and log.untrained == []
    assert all(len(v) == 30 for v in log.losses.values())
    kl_after = evaluate_transfer(model, held, kl=True)
    ce_after = evaluate_transfer(model, held)
    for layer in (0, 1):
        assert kl_after[layer] < 0.85 * kl_before[layer], (layer, kl_before, kl_after)
        assert ce_after[layer] < ce_before[layer]
    assert_only_new_changed(model, before)
    assert model.training is False  # the caller's mode is back


def test_each_layer_learns_from_the_frozen_models_hidden_states():
    """The first logged loss of every layer is the cross-entropy from the unconverted
    model's own (eager) attention weights to the student's weights on the input that the
    unconverted model gives that layer (Llama: RoPE, GQA; a right- and a left-padded row).
    A student fed its own hidden states differs from layer 1 on."""
    original = build("Llama", attn_implementation="eager")
    model = convert(copy.deepcopy(original), "hedgehog")
    ids, mask = inputs()
    seen: dict[int, torch.Tensor] = {}
    layers = [m for _, m in original.named_modules() if type(m).__name__ == "LlamaAttention"]
    handles = [m.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: seen.__setitem__(i, kwargs.get("hidden_states",
                                                                     args[0] if args else None)),
        with_kwargs=True) for i, m in enumerate(layers)]
    with torch.no_grad():
        teacher_weights = original(input_ids=ids, attention_mask=mask, use_cache=False,
                                   output_attentions=True).attentions
    for h in handles:
        h.remove()
    keep = mask.bool()
    expected = {}
    with torch.no_grad():
        for i, (_, module) in enumerate(converted_modules(model)):
            student = module.attn.weights(seen[i], mask=keep)
            ce = -(teacher_weights[i] * student.clamp_min(1e-12).log()).sum(-1)
            expected[i] = ce[keep[:, None, :].expand_as(ce)].mean()
    log = attention_transfer(model, [{"input_ids": ids, "attention_mask": mask}], steps=1,
                             progress=False)
    for i, value in expected.items():
        assert_close(torch.tensor(log.losses[i][0]), value, msg=f"layer {i}")


def test_lolcats_loss_falls_for_a_mechanism_whose_weights_do_not_give_its_output():
    """InLine attention (a term beside its weights): "auto" picks the output MSE, which
    falls by at least 15% on held-out batches in 30 steps (measured: 28% and 61%); Gated
    Attention's gate, which its weights do not see, also gets the output MSE."""
    model = convert(build("GPT-2"), "inline")
    first = converted_modules(model)[0][1]
    assert _resolve_loss("auto", first) == "lolcats"
    assert _resolve_loss("auto", converted_modules(convert(build("GPT-2"), "gated"))[0][1]) \
        == "lolcats"
    train, held = batches(8, 0), batches(2, 99)
    before_loss = evaluate_transfer(model, held)
    before = snapshot(model)
    log = attention_transfer(model, train, steps=30, progress=False)
    assert log.loss == "lolcats"
    after_loss = evaluate_transfer(model, held)
    for layer in (0, 1):
        assert after_loss[layer] < 0.85 * before_loss[layer], (before_loss, after_loss)
    assert_only_new_changed(model, before)


class Interrupted(Exception):
    pass


class Dies:
    """The batches of ``data``, pass after pass, until ``after`` batches were handed out:
    then it raises (a killed run)."""

    def __init__(self, data: list, after: int) -> None:
        self.data, self.after, self.count = data, after, 0

    def __iter__(self):
        for batch in self.data:
            if self.count == self.after:
                raise Interrupted
            self.count += 1
            yield batch


def test_resume_after_a_kill_gives_the_uninterrupted_run(tmp_path):
    """GPT-2 in training mode (residual dropout 0.1 on the student's output, so the random
    state matters), output MSE, 7 steps over 3 batches (the data is read three times). A
    run killed while fetching the 6th batch (checkpoint of step 4) and resumed equals a
    straight run bitwise: parameters and logged losses. The caller's random state is kept."""
    data = batches(3, 5)

    def fresh():
        model = convert(build("GPT-2"), "hedgehog").train()
        assert converted_modules(model)[0][1].attn.drop.p > 0
        return model

    straight = fresh()
    rng = torch.get_rng_state()
    log = attention_transfer(straight, data, loss="lolcats", steps=7, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)

    path = tmp_path / "transfer.pt"
    killed = fresh()
    with pytest.raises(Interrupted):
        attention_transfer(killed, Dies(data, 5), loss="lolcats", steps=7, seed=3, every=2,
                           checkpoint=path, progress=False)
    assert torch.load(path, weights_only=True)["step"] == 4
    resumed = fresh()
    again = attention_transfer(resumed, data, loss="lolcats", steps=7, seed=3, every=2,
                               checkpoint=path, progress=False)
    assert again.resumed_from == 4 and again.steps == 7
    assert again.losses == log.losses
    for (name, a), b in zip(new_parameters(straight).items(),
                            new_parameters(resumed).values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="another run"):
        attention_transfer(fresh(), data, loss="lolcats", steps=7, seed=4, checkpoint=path,
                           progress=False)
    # a checkpoint past the steps asked for: the refusal attnlab convert hf also makes
    assert checkpoint_step(path) == 7
    with pytest.raises(ValueError) as refused:
        attention_transfer(fresh(), data, loss="lolcats", steps=5, seed=3, checkpoint=path,
                           progress=False)
    assert str(refused.value) == past_steps(path, 7, 5) == (
        f"{path} is at step 7, beyond steps=5: pass steps=7 or more, or start from another "
        "checkpoint")


def test_checkpoint_step_and_past_steps(tmp_path):
    """The step of a checkpoint, read alone (None for no file, not a checkpoint, a step that
    is not an integer); the refusal of one past the steps, in the API's or the command's
    words, and none at or below them."""
    good, bad, odd = tmp_path / "good.pt", tmp_path / "bad.pt", tmp_path / "odd.pt"
    torch.save({"format": "x", "step": 12, "params": {"w": torch.zeros(3)}}, good)
    bad.write_bytes(b"not a checkpoint")
    torch.save({"step": 1.5}, odd)
    assert checkpoint_step(good) == 12
    assert [checkpoint_step(p) for p in (bad, odd, tmp_path / "none.pt")] == [None] * 3
    assert past_steps(good, 12, 12) is None and past_steps(good, 3, 12) is None
    assert past_steps(good, 12, 10, "--finetune-steps") == (
        f"{good} is at step 12, beyond --finetune-steps 10: pass --finetune-steps 12 or more, "
        "or start from another checkpoint")


def test_refusals():
    data = batches(1, 0)
    for mechanism in ("softmax", "sigmoid"):
        with pytest.raises(ValueError, match="nothing to train"):
            attention_transfer(convert(build("GPT-2"), mechanism), data, progress=False)
    with pytest.raises(ValueError, match="no converted attention"):
        attention_transfer(build("GPT-2"), data, progress=False)
    with pytest.raises(ValueError, match="teacher was not kept"):
        attention_transfer(convert(build("GPT-2"), "hedgehog", keep_teacher=False), data,
                           progress=False)
    model = convert(build("GPT-2"), "hedgehog")
    with pytest.raises(ValueError, match="out of range"):
        attention_transfer(model, data, layers=[2], progress=False)
    with pytest.raises(ValueError, match="loss must be"):
        attention_transfer(model, data, loss="kl", progress=False)
    attn = converted_modules(model)[0][1].attn
    attn.mechanism = dataclasses.replace(attn.mechanism, weights=False)
    with pytest.raises(ValueError, match="does not define"):
        attention_transfer(model, data, loss="hedgehog", progress=False)


def test_teacher_mode_is_the_original_model_and_is_undone():
    original = build("BERT")
    model = convert(copy.deepcopy(original), "hedgehog")
    ids, mask = inputs()
    with torch.no_grad():
        expected = outputs(original, ids, mask)
        with teacher_mode(model):
            got = outputs(model, ids, mask)
            assert not converted_modules(model)
    assert_close(got, expected)
    assert len(converted_modules(model)) == 2
    assert len(pretrained_parameters(model)) == 16


def test_convert_with_distill_is_convert_then_attention_transfer():
    """``convert(..., distill=batches, distill_options=...)`` trains the new parameters as
    ``attention_transfer`` called after ``convert`` does (bitwise: the same draws), and
    refuses to distill without the teacher or to take options without data."""
    data = batches(2, 0)
    options = {"steps": 3, "progress": False}
    fused = convert(build("GPT-2"), "hedgehog", distill=data, distill_options=options)
    plain = convert(build("GPT-2"), "hedgehog")
    untrained = {n: p.detach().clone() for n, p in new_parameters(plain).items()}
    attention_transfer(plain, data, **options)
    ours, theirs = new_parameters(fused), new_parameters(plain)
    assert ours.keys() == theirs.keys() == untrained.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert any(not torch.equal(ours[n], untrained[n]) for n in ours)  # it did train
    with pytest.raises(ValueError, match="keep_teacher"):
        convert(build("GPT-2"), "hedgehog", keep_teacher=False, distill=data)
    with pytest.raises(ValueError, match="without distill"):
        convert(build("GPT-2"), "hedgehog", distill_options=options)


def test_auto_refuses_the_hedgehog_loss_for_weights_that_are_not_distributions():
    """Linear attention with the identity feature map (DSF normaliser): its weights give the
    output exactly and see its new normaliser, but they are negative and their rows do not
    sum to 1, so the cross-entropy is unbounded below (it fell from 0.91 to -5 while the
    model did not improve): "auto" picks the output MSE, and "hedgehog" is refused. Hedgehog's
    own weights are distributions and keep the Hedgehog loss."""
    module = converted_modules(convert(build("GPT-2"), "linear", feature_map="identity",
                                       variant="dsf"))[0][1]
    assert _resolve_loss("auto", module) == "lolcats"
    with pytest.raises(ValueError, match="not one .*a weight of -") as refused:
        _resolve_loss("hedgehog", module)
    assert loss_refusal(module, "hedgehog") == str(refused.value)
    assert loss_refusal(module, "auto") is None and loss_refusal(module, "lolcats") is None
    hedgehog = converted_modules(convert(build("GPT-2"), "hedgehog"))[0][1]
    assert _resolve_loss("auto", hedgehog) == _resolve_loss("hedgehog", hedgehog) == "hedgehog"


def test_hedgehog_that_would_train_nothing_is_refused() -> None:
    """loss='hedgehog' where no new parameter changes the weights (Gated Attention: only an
    output gate) is refused before training; loss_refusal of one layer says the same."""
    model = convert(build("GPT-2"), "gated")
    with pytest.raises(ValueError, match="none of gated's new parameters .* nothing would "
                                         "train; use loss='lolcats'") as refused:
        attention_transfer(model, batches(1, 0), loss="hedgehog", steps=1, progress=False)
    # the same refusal from one converted layer alone (attnlab convert hf asks it early)
    module = converted_modules(model)[0][1]
    assert loss_refusal(module, "hedgehog") == str(refused.value)
    assert loss_refusal(module, "lolcats") is None
    hedgehog = converted_modules(convert(build("GPT-2"), "hedgehog"))[0][1]
    assert loss_refusal(hedgehog, "hedgehog") is None
    assert loss_refusal(hedgehog, "kl") == "loss must be one of ('auto', 'hedgehog', " \
        "'lolcats'), got 'kl'"


@pytest.mark.slow
def test_untrained_warning_does_not_recommend_the_loss_in_use() -> None:
    """A lolcats run whose loss reaches none of the new parameters (Sparsifiner's
    predictor: a top-k selection) warns without recommending the loss it already uses."""
    model = convert(build("GPT-2"), "sparsifiner")
    with pytest.warns(UserWarning, match="lolcats loss does not reach 12 of 12") as caught:
        attention_transfer(model, batches(1, 0, batch=2, length=8), loss="lolcats", steps=1,
                           progress=False)
    assert not any("loss='lolcats'" in str(w.message) for w in caught)


def test_progress_off_a_terminal(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """When stdout is not a terminal (a log file) a training loop's progress prints its
    header first, then a plain line at every tenth of the steps, the last included, and at
    least every PLAIN_EVERY_S seconds (here 0: every step)."""
    import attnlab.integrations.distill as distill

    with distill._bar(True, 20, 0, "stage") as advance:
        for _ in range(20):
            advance("loss 1")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "stage: 20 steps"
    assert [line.split(",")[0] for line in lines[1:]] == \
        [f"stage: step {i}/20" for i in range(2, 21, 2)]
    assert lines[-1].startswith("stage: step 20/20, loss 1, ")
    monkeypatch.setattr(distill, "PLAIN_EVERY_S", 0.0)
    with distill._bar(True, 20, 17, "stage") as advance:
        for _ in range(3):
            advance("loss 1")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "stage: 20 steps, resuming from step 17"
    assert [line.split(",")[0] for line in lines[1:]] == \
        [f"stage: step {i}/20" for i in (18, 19, 20)]


def test_finetune_log_text() -> None:
    """FinetuneLog's line: thousands separators and the step it resumed from."""
    from attnlab.integrations.finetune import FinetuneLog

    text = str(FinetuneLog("lm", None, trainable=144640, steps=3, losses=[2.0, 1.5],
                           resumed_from=2))
    assert text == ("fine-tuning (lm, full, 144,640 trained values): 3 steps, resumed from "
                    "step 2, loss 2 -> 1.5")
