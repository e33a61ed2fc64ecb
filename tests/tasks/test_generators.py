"""Task generators: what each batch must contain, seeded splits, clear errors."""

import pytest
import torch

from attnlab.tasks import make_task, split_generator
from attnlab.tasks.char_lm import corpus, split_corpus
from attnlab.tasks.copying import NOISE, SEP
from attnlab.tasks.markov import count_predictors
from attnlab.tasks.mqar import FILLER
from attnlab.tasks.tokens import IGNORE


def test_split_generators_are_disjoint_and_reproducible():
    train = {(s, k): split_generator(s, "train", k).initial_seed()
             for s in range(20) for k in range(3)}
    fixed = {(split, k): split_generator(0, split, k).initial_seed()
             for split in ("val", "test", "fit") for k in range(200)}
    assert len(set(train.values())) == len(train) and len(set(fixed.values())) == len(fixed)
    assert not set(train.values()) & set(fixed.values())
    # validation, test and fit data do not depend on the run seed; training data does
    assert split_generator(0, "test").initial_seed() == split_generator(7, "test").initial_seed()
    assert split_generator(0, "train").initial_seed() != split_generator(7, "train").initial_seed()
    a = torch.rand(3, generator=split_generator(4, "test"))
    assert torch.equal(a, torch.rand(3, generator=split_generator(4, "test")))
    with pytest.raises(ValueError, match="split must be one of"):
        split_generator(0, "valid")
    with pytest.raises(ValueError, match="evaluation split"):
        make_task("copy").evaluate(None, "train")


def test_unknown_task_or_parameter_is_named():
    with pytest.raises(ValueError, match="unknown task 'mqr'"):
        make_task("mqr")
    with pytest.raises(ValueError, match="has no parameter 'kv'.*train_kv"):
        make_task("mqar", kv=3)
    with pytest.raises(ValueError, match="4 n <= seq_len"):
        make_task("mqar", seq_len=16, train_kv=[8])


@pytest.mark.parametrize("num_kv", [1, 4, 8])
def test_mqar_pairs_queries_and_fillers(num_kv):
    task = make_task("mqar", vocab=64, seq_len=64, power=0.1)
    tokens, targets = task.sample(128, torch.Generator().manual_seed(0), num_kv=num_kv)
    half = 32
    keys, values = tokens[:, 0:2 * num_kv:2], tokens[:, 1:2 * num_kv:2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 64)).all()
    assert all(len(set(row.tolist())) == num_kv for row in keys)  # distinct keys
    rest = tokens[:, 2 * num_kv:]
    fillers = rest[(rest < half) & ~torch.isin(rest, keys)]
    assert (fillers == FILLER).all()  # a filler never looks like a key
    for b in range(128):
        pos = (targets[b] != IGNORE).nonzero().flatten()
        assert len(pos) == num_kv  # each key queried once
        lookup = dict(zip(keys[b].tolist(), values[b].tolist(), strict=True))
        for p in pos.tolist():
            assert tokens[b, p].item() in lookup  # the query is a key ...
            assert targets[b, p].item() == lookup[tokens[b, p].item()]  # ... its value
            assert tokens[b, p + 1].item() == targets[b, p].item()


def test_mqar_query_slots_follow_a_power_law():
    task = make_task("mqar", vocab=64, seq_len=256, power=0.1)
    tokens, targets = task.sample(512, torch.Generator().manual_seed(1), num_kv=4)
    slots = ((targets != IGNORE).nonzero()[:, 1] - 8) // 2
    counts = torch.bincount(slots, minlength=124).float()
    assert counts[:10].sum() > 3 * counts[-10:].sum() * 5  # near slots far more frequent
    assert counts[60:].sum() > 0  # ... but far ones occur


def test_copy_selective_copy_and_induction_targets():
    g = torch.Generator().manual_seed(0)
    inputs, targets = make_task("copy", vocab=10, length=8).sample(16, g, length=5)
    assert (inputs[:, 5] == SEP).all() and torch.equal(targets[:, 5:], inputs[:, :5])
    assert (targets[:, :5] == IGNORE).all()

    task = make_task("selective_copy", vocab=8, region=20, count=5)
    inputs, targets = task.sample(32, g)
    for b in range(32):
        region = inputs[b, :20]
        data = region[region != NOISE]
        assert torch.equal(targets[b, 20:], data)  # the data tokens, in order
        assert inputs[b, 20] == SEP and torch.equal(inputs[b, 21:], data[:-1])

    task = make_task("induction", vocab=40, length=32, segment=6)
    inputs, targets = task.sample(64, g)
    for b in range(64):
        pos = (targets[b] != IGNORE).nonzero().flatten().tolist()
        assert len(pos) == 5
        for p in pos:  # the same token earlier in the first half was followed by the target
            earlier = [q for q in range(16) if inputs[b, q] == inputs[b, p]]
            assert any(inputs[b, q + 1] == targets[b, p] for q in earlier)
            # and every earlier occurrence was: the lookup has one answer
            before = [q for q in range(p) if inputs[b, q] == inputs[b, p]]
            assert all(inputs[b, q + 1] == targets[b, p] for q in before), (b, p)


def test_icl_regression_baselines_are_ordered_as_theory_says():
    task = make_task("icl_regression", eval_contexts=[5, 10, 40])
    test = task.draw(4096, 10, split_generator(0, "test"))
    base = task.baselines(10, test)
    # ridge is Bayes optimal: no other predictor beats it (up to sampling noise)
    assert base["ridge"] <= min(base.values()) + 1e-3
    assert base["ridge"] > task.noise  # the noise floor
    assert base["least_squares"] > base["ridge"]
    x, y, xq, yq = test
    # ridge written out for one episode
    beta = torch.linalg.solve(x[0].T.double() @ x[0].double() + 0.5 * torch.eye(5).double(),
                              x[0].T.double() @ y[0].double())
    raw = task.baseline_predictions(x[:1], y[:1], xq[:1])
    assert torch.allclose(raw["ridge"], (beta * xq[0].double()).sum()[None])
    # debiased GD removes the mean of x: with centred covariates it equals averaging
    xc = x.double() - x.double().mean(1, keepdim=True)
    raw_c = task.baseline_predictions(xc, y, xq)
    assert torch.allclose(raw_c["debiased_gd"], raw_c["averaging"], atol=1e-10)
    # the step fixed at the training length is no better than the one fitted per length
    assert base["debiased_gd_fixed"] >= base["debiased_gd"] - 1e-12
    assert task.fitted_step("debiased_gd", 40) != task.fitted_step("debiased_gd", 10)
    at_train = task.baselines(task.context, task.draw(512, task.context,
                                                      split_generator(0, "test", 1)))
    assert at_train["debiased_gd_fixed"] == pytest.approx(at_train["debiased_gd"])


def test_test_time_regression_local_estimators_beat_a_global_line():
    task = make_task("test_time_regression", context=64, eval_contexts=[64])
    test = task.draw(2048, 64, split_generator(0, "test"))
    base = task.baselines(64, test)
    assert base["local_linear"] < base["least_squares"]
    assert base["nadaraya_watson"] < base["least_squares"]


def test_markov_bayes_predictor_matches_counts_written_out():
    seq = torch.tensor([[0, 1, 0, 1, 1, 2, 0, 1]])
    probs = count_predictors(seq, 3, 0.5)["bayes"]
    assert torch.allclose(probs.sum(-1), torch.ones(1, 7, dtype=torch.float64))
    # at step 6 (previous token 0, seen 0->1 twice before): (2 + .5) / (2 + 1.5)
    assert probs[0, 6, 1].item() == pytest.approx(2.5 / 3.5)
    task = make_task("markov", states=4, length=64)
    seq = task.sequences(512, split_generator(0, "test"))
    nll = {k: -p.gather(-1, seq[:, 1:, None]).log().mean().item()
           for k, p in count_predictors(seq, 4, task.alpha).items()}
    assert nll["bayes"] < nll["unigram"] < torch.log(torch.tensor(4.0)).item()


def test_char_lm_corpus_splits_are_disjoint_and_offline():
    data = corpus()
    assert len(data) > 200_000 and data.min() >= 0
    train, val, test = split_corpus("train"), split_corpus("val"), split_corpus("test")
    assert len(train) + len(val) + len(test) == len(data)
    assert torch.equal(torch.cat([train, val, test]), data)  # consecutive, no overlap
    inputs, targets = make_task("char_lm", length=16).sample(4, torch.Generator(), "test")
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # the test windows are fixed, >= 1024, and spread over the whole test part
    task = make_task("char_lm", length=32)
    x, _ = task.eval_inputs("test", 32)
    assert x.shape == (1024, 32) and torch.equal(x, task.eval_inputs("test", 32)[0])
    assert torch.equal(x[0], test[:32]) and torch.equal(x[-1], test[-33:-1])


def test_digits_split_is_fixed_and_disjoint():
    from attnlab.tasks.digits import digits_split

    split = digits_split()
    (xtr, ytr), (xva, yva), (xte, yte) = split["train"], split["val"], split["test"]
    assert len(ytr) == 1257 and len(yva) == 180 and len(yte) == 360
    assert xtr.shape[1:] == (1, 8, 8)
    train_rows = {tuple(r.tolist()) for r in xtr.flatten(1)}
    val_rows = {tuple(r.tolist()) for r in xva.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in xva.flatten(1)) < 5
    assert sum(tuple(r.tolist()) in val_rows for r in xte.flatten(1)) < 5
    assert sum(tuple(r.tolist()) in train_rows for r in xte.flatten(1)) < 5  # rare duplicates


def test_first_token_attention_is_the_mean_weight_on_token_one():
    from attnlab.models import TransformerLM
    from attnlab.tasks.char_lm import ALPHABET, BOS
    from attnlab.tasks.sinks import first_token_attention

    torch.manual_seed(0)
    model = TransformerLM(20, dim=16, depth=2, heads=2)
    tokens = torch.randint(0, 20, (3, 9))
    for block in model.blocks:  # zero queries: uniform causal attention in every layer
        torch.nn.init.zeros_(block.attn.qkv.q.weight)
    out = first_token_attention(model, tokens)
    uniform = sum(1 / (i + 1) for i in range(1, 9)) / 8  # queries 2..9 see i + 1 keys
    assert set(out) == {"first_token_attention", "first_token_attention_L0",
                        "first_token_attention_L1", "sink_heads"}
    assert out["first_token_attention"] == pytest.approx(uniform, rel=1e-5)
    assert out["sink_heads"] == 0.0  # uniform attention: no head above 0.3
    assert not model.blocks[0].attn._forward_pre_hooks  # the capture hooks are removed
    # only some queries: queries 2 and 3 see 2 and 3 keys
    queries = torch.zeros(3, 9, dtype=torch.bool)
    queries[:, 1:3] = True
    sub = first_token_attention(model, tokens, queries=queries)
    assert sub["first_token_attention"] == pytest.approx((1 / 2 + 1 / 3) / 2, rel=1e-5)
    assert sub["sink_heads"] == 1.0  # every head's mean (0.42) is above 0.3
    assert first_token_attention(model, tokens, 0.5, queries)["sink_heads"] == 0.0
    # bos=True: every window starts with a start token that is no character
    task = make_task("char_lm", length=8, bos=True)
    inputs, targets = task.sample(2, torch.Generator())
    assert BOS == len(ALPHABET) and task.vocab_size() == len(ALPHABET) + 1
    assert (inputs[:, 0] == BOS).all() and (inputs[:, 1:] < BOS).all()
    assert inputs.shape == (2, 8) and torch.equal(inputs[:, 1:], targets[:, :-1])


def test_backcopy_follows_its_two_rules():
    task = make_task("backcopy", vocab=12, length=40, triggers=2)
    seq = task.sequences(256, split_generator(0, "test"))
    assert (seq[:, 0] == task.bos).all() and (seq[:, 1:] < task.bos).all()
    assert (seq[:, 1] >= task.triggers).all()  # the first token is never a trigger
    after_trigger = seq[:, 1:-1] < task.triggers
    # after a trigger, the token before it comes again
    assert torch.equal(seq[:, 2:][after_trigger], seq[:, :-2][after_trigger])
    # elsewhere the chain's transition frequencies match its matrix
    chain = task.chain()
    prev, nxt = seq[:, 1:-1][~after_trigger], seq[:, 2:][~after_trigger]
    counts = torch.zeros(12, 12, dtype=torch.float64)
    counts.index_put_((prev, nxt), torch.ones(len(prev), dtype=torch.float64), accumulate=True)
    row = counts.sum(1).argmax()
    freq = counts[row] / counts[row].sum()
    assert (freq - chain[row]).abs().max() < 0.05
    assert torch.allclose(chain.sum(1), torch.ones(12, dtype=torch.float64))
    with pytest.raises(ValueError, match="triggers=12 must be < vocab=12"):
        make_task("backcopy", vocab=12, triggers=12)


def test_backcopy_bayes_baseline_is_the_true_chain():
    from attnlab.models import TransformerLM

    task = make_task("backcopy", vocab=8, length=16)
    model = TransformerLM(task.vocab_size(), dim=16, depth=1, heads=2).eval()
    result = task.evaluate(model, "test")
    inputs, targets = task.sample(task.eval_size, split_generator(0, "test"))
    ordinary = (inputs >= task.triggers) & (inputs != task.bos)
    expected = -task.chain()[inputs[ordinary], targets[ordinary]].log().mean().item()
    assert result.baselines["bayes"]["bigram"] == pytest.approx(expected, rel=1e-6)
    assert result.baselines["bayes"]["backcopy"] == 0.0
    assert {"first_token_attention", "sink_heads", "first_token_attention_trigger",
            "backcopy_accuracy"} <= set(result.metrics)


def test_icl_maps_sequences_follow_one_map_with_distinct_inputs():
    task = make_task("icl_maps", symbols=8, maps=5, pairs=6, eval_shots=[0, 2])
    table = task.table()
    inputs, targets = task.sample(64, torch.Generator().manual_seed(1))
    assert inputs.shape == (64, 12) and (inputs[:, 0] == task.bos).all()
    xs, ys = inputs[:, 1::2], torch.cat([inputs[:, 2::2], targets[:, -1:]], 1) - task.symbols
    assert ((xs >= 0) & (xs < 8)).all() and ((ys >= 0) & (ys < 8)).all()
    assert all(len(set(row.tolist())) == 6 for row in xs)  # never a repeated input
    for x, y in zip(xs, ys, strict=True):  # some map of the family gives every pair
        assert any((table[t, x] == y).all() for t in range(5))
    assert (targets[:, 0::2] == IGNORE).all() and (targets[:, 1::2] != IGNORE).all()
    _, one = task.sample(8, torch.Generator().manual_seed(1), shots=2)
    assert ((one != IGNORE).nonzero()[:, 1] == 5).all()  # only the answer after 2 pairs
    tasks, queries = torch.tensor([0, 4, 2]), torch.tensor([3, 3, 7])
    tokens, answers = task.prompts(tasks, 3, torch.Generator().manual_seed(2), queries=queries)
    assert tokens.shape == (3, 8) and (tokens[:, -1] == queries).all()
    assert (answers == table[tasks, queries] + 8).all()
    assert ((tokens[:, 1:-1:2] != queries[:, None]).all())  # demonstrations avoid the query
    assert (tokens[:, 2::2] == table[tasks[:, None], tokens[:, 1:-1:2]] + 8).all()


def test_icl_maps_bayes_posterior_written_out():
    task = make_task("icl_maps", symbols=6, maps=4, pairs=4, eval_shots=[0, 1])
    table = task.table().tolist()
    inputs, _ = task.sample(32, torch.Generator().manual_seed(3))
    for position in (1, 3, 5):
        predictive = task.bayes(inputs, position)
        for row, p in zip(inputs.tolist(), predictive, strict=True):
            shown = [(row[i], row[i + 1] - 6) for i in range(1, position, 2)]
            alive = [t for t in range(4) if all(table[t][x] == y for x, y in shown)]
            expected = torch.zeros(6, dtype=torch.float64)
            for t in alive:
                expected[table[t][row[position]]] += 1 / len(alive)
            torch.testing.assert_close(p, expected)


def test_icl_maps_oracle_scores_the_bayes_baseline():
    task = make_task("icl_maps", symbols=6, maps=4, pairs=4, eval_shots=[0, 1, 3])

    class Oracle(torch.nn.Module):  # the Bayes predictive at every input position
        def forward(self, inputs):
            logits = torch.full((*inputs.shape, task.vocab_size()), -1e9)
            for position in range(1, inputs.shape[1], 2):
                logits[:, position, 6:12] = task.bayes(inputs, position).float()
            return logits

    result = task.evaluate(Oracle(), "test")
    assert result.slices == pytest.approx(result.baselines["bayes"])
    assert result.slices["0"] < result.slices["1"] < result.slices["3"] + 1e-9
    assert result.metrics["bayes_accuracy"] == pytest.approx(
        sum(result.baselines["bayes"].values()) / 3)


def test_icl_maps_rejects_impossible_settings():
    with pytest.raises(ValueError, match="distinct inputs"):
        make_task("icl_maps", symbols=4, pairs=5, eval_shots=[0])
    with pytest.raises(ValueError, match="eval_shots"):
        make_task("icl_maps", pairs=4, eval_shots=[4])
