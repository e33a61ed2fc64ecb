"""Attention supervision: the loss on planted maps, MQAR's target keys, the loss pulling a
head's attention onto its targets, and the arena's [train.supervise]."""

import math

import pytest
import torch

from attnlab.arena.config import parse_sweep
from attnlab.arena.supervision import AttentionSupervisor, supervision_loss, target_mass
from attnlab.arena.trainer import train_run
from attnlab.heads.capture import capture
from attnlab.models import TransformerLM
from attnlab.tasks import make_task
from attnlab.tasks.tokens import IGNORE


def test_loss_is_minus_log_of_the_mass_on_the_targets():
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]).expand(1, 2, 2, 3).clone()
    w[0, 1] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([[[True, True, False], [False, True, True]]])
    queries = torch.tensor([[True, False]])  # only query 0 is supervised
    torch.testing.assert_close(target_mass(w, targets)[0, :, 0], torch.tensor([0.8, 1.0]))
    expected = (-math.log(0.8) - math.log(1.0)) / 2
    assert float(supervision_loss(w, targets, queries)) == pytest.approx(expected)
    both = torch.tensor([[True, True]])
    expected = (-math.log(0.8) - math.log(0.9) - 0.0 - 0.0) / 4  # query 1: 0.9 and 1
    assert float(supervision_loss(w, targets, both)) == pytest.approx(expected)
    assert float(supervision_loss(w, targets, torch.zeros(1, 2, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        target_mass(w, targets[:, :1])


def test_mqar_targets_are_the_values_that_answer_each_query():
    task = make_task("mqar", vocab=32, seq_len=32, train_kv=(4,), eval_kv=(4,))
    tokens, labels = task.sample(8, torch.Generator().manual_seed(0))
    targets, queries = task.attention_targets((tokens, labels))
    assert torch.equal(queries, labels != IGNORE) and int(queries.sum()) == 8 * 4
    assert bool((targets.sum(-1) == queries.long()).all())  # one target per query, else none
    b, q, k = targets.nonzero(as_tuple=True)
    assert torch.equal(tokens[b, k], labels[b, q])  # the target key holds the answer
    assert torch.equal(tokens[b, k - 1], tokens[b, q])  # right after the query's key
    assert bool((k < q).all()) and bool((k < 8).all())  # in the key-value block


def test_supervision_pulls_a_head_onto_its_targets():
    task = make_task("mqar", vocab=32, seq_len=32, train_kv=(4,), eval_kv=(4,))
    torch.manual_seed(0)
    model = TransformerLM(vocab=32, dim=32, depth=2, heads=2, max_len=32)
    batch = task.sample(16, torch.Generator().manual_seed(1))
    targets, queries = task.attention_targets(batch)

    def mass(head):
        with torch.no_grad(), capture(model, ["L1.weights"]) as cap:
            model(batch[0])
        return float(target_mass(cap["L1.weights"], targets)[:, head][queries].mean())

    before = mass(0), mass(1)
    supervisor = AttentionSupervisor(model, [(1, 0)], weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        model(batch[0])
        loss = supervisor.loss(targets, queries)
        opt.zero_grad()
        loss.backward()
        opt.step()
    supervisor.remove()
    after = mass(0), mass(1)
    assert before[0] < 0.15 and after[0] > 0.6  # the supervised head learnt its targets
    assert after[1] < 0.5 * after[0]  # the other head was not asked to
    with pytest.raises(RuntimeError, match="forward first"):
        AttentionSupervisor(model, [(1, 0)], 1.0).loss(targets, queries)
    with pytest.raises(ValueError, match="out of range"):
        AttentionSupervisor(model, [(2, 0)], 1.0)


def sweep(task, params, supervise=None):
    train = {"steps": 4, "batch_size": 4, "curve_points": 4}
    if supervise is not None:
        train["supervise"] = supervise
    return parse_sweep({"task": task, "task_params": params, "seeds": 1,
                        "mechanisms": ["softmax"], "model": {"dim": 16, "depth": 2,
                                                             "heads": 2}, "train": train})


def test_arena_training_adds_the_supervision_loss():
    params = {"vocab": 32, "seq_len": 32, "train_kv": [4], "eval_kv": [4]}
    plain = sweep("mqar", params).runs()[0]
    supervised = sweep("mqar", params, {"heads": [[1, 0]], "weight": 1.0}).runs()[0]
    assert supervised.key != plain.key and "supervise" not in plain.train
    a, b = train_run(plain), train_run(supervised)
    assert a["status"] == b["status"] == "done", b.get("error")
    # the first step's task loss is the same (the weights path may round differently)
    assert a["curves"]["train_loss"][0] == pytest.approx(b["curves"]["train_loss"][0], abs=1e-5)
    assert a["curves"]["train_loss"][-1] != b["curves"]["train_loss"][-1]  # then it steers
    wrong = sweep("markov", {"states": 3, "length": 16}, {"heads": [[0, 0]]}).runs()[0]
    failed = train_run(wrong)
    assert failed["status"] == "failed" and "attention_targets" in failed["error"]
    with pytest.raises(ValueError, match="supervise"):
        sweep("mqar", params, {"heads": []})
