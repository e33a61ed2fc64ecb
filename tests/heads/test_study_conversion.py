"""The conversion study's measures: embedding agreement, perplexity, held-out sentences and
``convert_lm`` (a softmax TransformerLM moved onto another mechanism)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.heads.studies.conversion import (
    LMTeacher,
    contestant,
    convert_lm,
    embedding_agreement,
    held_out_sentences,
    lm_as_converted,
    nearest_neighbours,
    perplexity,
    sentence_pool,
)
from attnlab.tasks import make_task
from tests.tolerances import assert_close

TASK = {"length": 16, "eval_windows": 4}
MODEL = {"dim": 16, "depth": 2, "heads": 2}


def _teacher(seed: int = 0) -> LMTeacher:
    torch.manual_seed(seed)
    model = make_task("char_lm", **TASK).build_model("softmax", {}, **MODEL).eval()
    return LMTeacher(model, dict(TASK), dict(MODEL), 0, seed)


def test_nearest_neighbours_by_hand() -> None:
    # four directions: 0 and 1 are close, 2 and 3 are close, the pairs far apart
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-0.1, 1.0]])
    assert nearest_neighbours(e).tolist() == [1, 0, 3, 2]
    with pytest.raises(ValueError, match="N >= 2"):
        nearest_neighbours(e[:1])


def test_agreement_identical_is_one_and_shuffled_lower() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    same = embedding_agreement(teacher.clone(), teacher)
    assert_close(torch.tensor(same["cosine"]), torch.tensor(1.0))
    assert same["nn_agreement"] == 1.0
    # a shuffled model: every sentence gets another sentence's embedding
    shuffled = embedding_agreement(teacher[torch.randperm(64, generator=g)], teacher)
    assert shuffled["cosine"] < 0.5 and shuffled["nn_agreement"] < 0.5
    # a slightly perturbed model sits in between: high cosine, most neighbours kept
    noisy = embedding_agreement(teacher + 0.05 * torch.randn(64, 32, generator=g), teacher)
    assert shuffled["cosine"] < noisy["cosine"] < 1.0
    assert shuffled["nn_agreement"] < noisy["nn_agreement"]
    # a scaled copy has the same directions: cosine 1 and the same neighbours
    scaled = embedding_agreement(3.0 * teacher, teacher)
    assert_close(torch.tensor(scaled["cosine"]), torch.tensor(1.0))
    assert scaled["nn_agreement"] == 1.0
    with pytest.raises(ValueError, match="one shape"):
        embedding_agreement(teacher[:3], teacher)


def test_perplexity_is_exp_mean_cross_entropy() -> None:
    model = _teacher().model
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 96, (5, 16), generator=g)
    targets = torch.randint(0, 96, (5, 16), generator=g)
    with torch.no_grad():
        logp = model(inputs).double().log_softmax(-1)
    expected = math.exp(-logp.gather(-1, targets[..., None]).mean().item())
    # batches of 2 (three forward passes, the last one short) give the same number
    got = perplexity(model, inputs, targets, batch_size=2)
    assert_close(torch.tensor(got, dtype=torch.float32), torch.tensor(expected,
                                                                      dtype=torch.float32))
    assert model.training is False


def test_perplexity_of_a_uniform_model_is_the_vocabulary() -> None:
    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*x.shape, 37) + self.w

    x = torch.zeros(3, 4, dtype=torch.long)
    assert_close(torch.tensor(perplexity(Uniform(), x, x)), torch.tensor(37.0))
    with pytest.raises(ValueError, match="one non-empty"):
        perplexity(Uniform(), x, x[:, :2])


def test_convert_lm_softmax_is_the_teacher_and_new_parameters_are_new() -> None:
    teacher = _teacher()
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    same = convert_lm(teacher, "softmax")
    with torch.no_grad():
        assert torch.equal(same(x), teacher.model(x))
    hedgehog = convert_lm(teacher, "hedgehog", {}, seed=3)
    state, old = hedgehog.state_dict(), teacher.model.state_dict()
    for name, tensor in old.items():  # every teacher tensor in its place
        assert torch.equal(state[name], tensor), name
    new = sorted(k for k in state if k not in old)
    assert new and all(".attn.phi" in k for k in new)
    # the feature map keeps its constructor's identity initialisation
    assert torch.equal(state["blocks.0.attn.phi.weight"][0], torch.eye(8))
    with torch.no_grad():
        assert not torch.allclose(hedgehog(x), teacher.model(x))


def test_convert_lm_refuses_what_cannot_hold_the_teacher() -> None:
    with pytest.raises(ValueError, match="rfa: cannot hold the softmax teacher's tensors"):
        convert_lm(_teacher(), "rfa")
    with pytest.raises(ValueError, match="agent"):
        convert_lm(_teacher(), "agent")  # bidirectional only


def test_contestants() -> None:
    assert contestant("elu+1").mechanism == "linear"
    assert contestant("lssa", {"reweight_p": 3.0}).kwargs == {"reweight_p": 3.0}
    assert contestant("dma").mechanism == "dma"
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        contestant("nope")


@pytest.mark.slow
def test_held_out_sentences() -> None:
    pool = sentence_pool("test")
    assert len(pool) > 200 and len(set(pool)) == len(pool)
    assert not set(pool) & set(sentence_pool("train"))  # held out: none seen in training
    a, b = held_out_sentences(20, 0), held_out_sentences(20, 1)
    assert a == held_out_sentences(20, 0) and a != b and len(set(a)) == 20
    assert all(s[0].isupper() and s[-1] in ".!?" for s in a)
    with pytest.raises(ValueError, match="count must be"):
        held_out_sentences(len(pool) + 1, 0)


def _batches(count: int, seed: int, batch: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = _teacher().model.embed.num_embeddings
    return [torch.randint(0, vocab, (batch, TASK["length"]), generator=gen)
            for _ in range(count)]


def test_attention_transfer_of_a_converted_transformer_lm() -> None:
    """The causal arm's distillation: a TransformerLM moved onto Hedgehog, wrapped by
    ``lm_as_converted``, gets attention transfer as a Hugging Face conversion does. The first
    step's loss of each layer is the cross-entropy from the softmax teacher's own weights to
    the student's, both on the hidden states the TEACHER feeds that layer (teacher forcing);
    the loss falls on held-out batches; only the new parameters change; the teacher is
    unchanged; the blocks get their own attention back."""
    from attnlab.integrations.distill import attention_transfer, evaluate_transfer
    from attnlab.mechanisms.base import Attention

    teacher = _teacher()
    student = convert_lm(teacher, "hedgehog", seed=0)
    teacher_state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    train, held = _batches(6, 0), _batches(2, 99)

    # the expected first-step losses, from the teacher's own forward
    inputs: dict[int, torch.Tensor] = {}
    blocks = list(teacher.model.blocks)
    handles = [b.attn.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, b in enumerate(blocks)]
    with torch.no_grad():
        teacher.model(train[0])
    for h in handles:
        h.remove()
    expected = {}
    with torch.no_grad():
        for i, block in enumerate(blocks):
            t = block.attn.weights(inputs[i])
            s = student.blocks[i].attn.weights(inputs[i])
            expected[i] = (-(t * s.clamp_min(1e-12).log()).sum(-1)).mean()

    with lm_as_converted(student, teacher) as wrapped:
        before = evaluate_transfer(wrapped, held, kl=True)
        log = attention_transfer(wrapped, train * 3, loss="hedgehog", steps=18, lr=3e-2,
                                 progress=False)
        after = evaluate_transfer(wrapped, held, kl=True)
    assert log.loss == "hedgehog" and log.untrained == []
    for i, value in expected.items():
        assert_close(torch.tensor(log.losses[i][0]), value, msg=f"layer {i}")
    for i in before:
        assert after[i] < 0.8 * before[i], (i, before[i], after[i])
    assert all(isinstance(b.attn, Attention) for b in student.blocks)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, student_state[k])}
    new = {k for k in student_state if k not in teacher_state}
    assert changed and changed <= new, changed - new
