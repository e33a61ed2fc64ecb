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
    seeds = {(s, split): split_generator(s, split).initial_seed()
             for s in range(20) for split in ("train", "test", "fit")}
    assert len(set(seeds.values())) == len(seeds)
    a = torch.rand(3, generator=split_generator(4, "test"))
    assert torch.equal(a, torch.rand(3, generator=split_generator(4, "test")))
    with pytest.raises(ValueError, match="split must be one of"):
        split_generator(0, "valid")


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


def test_icl_regression_baselines_are_ordered_as_theory_says():
    task = make_task("icl_regression", eval_contexts=[5, 10, 40])
    test = task.draw(4096, 10, split_generator(0, "test"))
    base = task.baselines(10, 0, test)
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


def test_test_time_regression_local_estimators_beat_a_global_line():
    task = make_task("test_time_regression", context=64, eval_contexts=[64])
    test = task.draw(2048, 64, split_generator(0, "test"))
    base = task.baselines(64, 0, test)
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
    train, test = split_corpus("train"), split_corpus("test")
    assert len(train) + len(test) == len(data)
    inputs, targets = make_task("char_lm", length=16).sample(4, torch.Generator(), "test")
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_digits_split_is_fixed_and_disjoint():
    from attnlab.tasks.digits import digits_split

    split = digits_split()
    (xtr, ytr), (xte, yte) = split["train"], split["test"]
    assert len(ytr) == 1437 and len(yte) == 360 and xtr.shape[1:] == (1, 8, 8)
    train_rows = {tuple(r.tolist()) for r in xtr.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in xte.flatten(1)) < 5  # rare duplicates


def test_first_token_attention_is_the_mean_weight_on_token_one():
    from attnlab.models import TransformerLM
    from attnlab.tasks.char_lm import BOS, first_token_attention

    torch.manual_seed(0)
    model = TransformerLM(20, dim=16, depth=2, heads=2)
    tokens = torch.randint(0, 20, (3, 9))
    for block in model.blocks:  # zero queries: uniform causal attention in every layer
        torch.nn.init.zeros_(block.attn.q_proj.weight)
    out = first_token_attention(model, tokens)
    uniform = sum(1 / (i + 1) for i in range(1, 9)) / 8  # queries 2..9 see i + 1 keys
    assert set(out) == {"first_token_attention", "first_token_attention_L0",
                        "first_token_attention_L1"}
    assert out["first_token_attention"] == pytest.approx(uniform, rel=1e-5)
    assert not model.blocks[0].attn._forward_pre_hooks  # the capture hooks are removed
    # bos=True: every window starts with the same token
    inputs, _ = make_task("char_lm", length=8, bos=True).sample(2, torch.Generator())
    assert (inputs[:, 0] == BOS).all() and not (inputs[:, 1:] == BOS).all()
