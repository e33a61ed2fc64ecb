"""Activation patching and path patching (attnlab.heads.patching), each checked against a run
written here with plain forward hooks or with the microscope's ablate, on models whose answer
is known; and the heat map."""

import pytest
import torch

from attnlab import heads as hd
from attnlab.heads import patching as pt
from attnlab.heads.metrics import logit_difference
from attnlab.models import TransformerLM
from tests.tolerances import assert_close, tolerance

METRIC = logit_difference(3, 4)


def small_lm(seed: int = 0, depth: int = 2, heads: int = 4) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(vocab=11, dim=32, depth=depth, heads=heads).eval()


def pair(length: int = 8, where: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted token batches that differ at one position."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 11, (3, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, where] = (corrupted[:, where] + 1 + torch.arange(3)) % 11
    return clean, corrupted


def metric_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return METRIC(model(tokens))


def close(actual, expected, msg=None) -> None:
    """Scores (float64 differences of float32 metrics) against a float32 run: the tolerance
    of float32, in which the model ran."""
    assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), msg=msg)


def zero_tolerance(scores) -> float:
    return tolerance(scores.scores.float(), torch.zeros(()))["atol"]


def manual_patch(model, run_on, source, layer, point, index):
    """metric(run_on) with model.blocks[layer].attn.hook_<point>[:, *index] taken from the
    run on ``source`` (plain forward hooks, no code of attnlab.heads)."""
    hook_point = getattr(model.blocks[layer].attn, f"hook_{point}")
    kept = {}
    handle = hook_point.register_forward_hook(lambda _m, _i, out: kept.setdefault("v", out))
    with torch.no_grad():
        model(source)
    handle.remove()

    def replace(_m, _i, out):
        out = out.clone()
        out[(slice(None), *index)] = kept["v"][(slice(None), *index)]
        return out
    handle = hook_point.register_forward_hook(replace)
    try:
        return metric_of(model, run_on)
    finally:
        handle.remove()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_a_head_equals_a_manual_replacement_of_its_output(direction):
    model = small_lm()
    clean, corrupted = pair()
    scores = pt.activation_patching(model, clean, corrupted, METRIC, direction=direction)
    assert scores.scores.shape == (2, 4) and scores.axes == ("layer", "head")
    run_on, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    base = metric_of(model, run_on)
    expected = torch.stack([torch.stack([manual_patch(model, run_on, source, layer, "heads",
                                                      (slice(None), h)) - base
                                         for h in range(4)]) for layer in range(2)])
    close(scores.scores, expected)
    assert expected.abs().max() > 1e-3  # the heads matter on these inputs
    assert scores.clean == pytest.approx(float(metric_of(model, clean)), abs=1e-6)
    assert scores.corrupted == pytest.approx(float(metric_of(model, corrupted)), abs=1e-6)


@pytest.mark.parametrize("point, layer, head, position, index", [
    ("q", 1, 2, 7, (2, 7)), ("k", 0, 1, 2, (1, 2)), ("v", 1, 3, 4, (3, 4)),
    ("weights", 1, 0, 7, (0, 7)), ("heads", 0, 1, 5, (5, 1))])
def test_per_position_pieces_of_each_point_equal_manual_replacements(point, layer, head,
                                                                     position, index):
    model = small_lm()
    clean, corrupted = pair()
    scores = pt.activation_patching(model, clean, corrupted, METRIC, point=point,
                                    per_position=True)
    assert scores.axes == ("layer", "head", "position") and scores.scores.shape == (2, 4, 8)
    expected = manual_patch(model, corrupted, clean, layer, point, index) - \
        metric_of(model, corrupted)
    assert abs(float(expected)) > 1e-4  # the piece matters
    close(scores.scores[layer, head, position], expected)
    # causal: positions before the corrupted one hold the same activations, nothing changes
    assert scores.scores[:, :, :2].abs().max() <= zero_tolerance(scores)


def one_head_model() -> TransformerLM:
    """Only head 2 of layer 1 passes anything on (every other head_scale is 0): the one path
    from an earlier token to the last position's logits."""
    model = small_lm(seed=3)
    with torch.no_grad():
        model.blocks[0].attn.head_scale.zero_()
        model.blocks[1].attn.head_scale[[0, 1, 3]] = 0.0
    return model


def test_the_one_head_that_carries_the_answer_has_the_largest_score_and_restores_it():
    model = one_head_model()
    clean, corrupted = pair()
    scores = pt.activation_patching(model, clean, corrupted, METRIC)
    (top, value), *rest = scores.top(8)
    assert top == (1, 2)
    gap = metric_of(model, clean) - metric_of(model, corrupted)
    assert gap.abs() > 1e-2
    # a complete cut for the last position: denoising the head restores the clean metric
    close(value, gap)
    assert all(abs(v) <= zero_tolerance(scores) for _, v in rest)
    noised = pt.activation_patching(model, clean, corrupted, METRIC, direction="noise",
                                    per_position=True)
    assert noised.top(1)[0][0] == (1, 2, 7)
    close(noised.scores[1, 2, 7], -gap)


def test_patching_identical_inputs_scores_zero_and_layers_choose_rows():
    model = small_lm()
    clean, _ = pair()
    for point, per_position, chunk in (("heads", True, 24), ("k", True, 16),
                                       ("weights", False, 8)):
        scores = pt.activation_patching(model, clean, clean.clone(), METRIC, point=point,
                                        per_position=per_position, pieces_per_forward=chunk)
        close(scores.scores, torch.zeros_like(scores.scores), msg=point)
    only = pt.activation_patching(model, *pair(), METRIC, layers=[1])
    full = pt.activation_patching(model, *pair(), METRIC, pieces_per_forward=1)
    assert only.scores[0].isnan().all()
    close(only.scores[1], full.scores[1])


def test_residual_points_restore_the_clean_metric_through_a_complete_cut():
    model = small_lm()
    clean, corrupted = pair()
    gap = metric_of(model, clean) - metric_of(model, corrupted)
    whole = pt.activation_patching(model, clean, corrupted, METRIC, point="resid_pre")
    assert whole.axes == ("layer",) and whole.scores.shape == (2,)
    close(whole.scores, gap.expand(2))  # every block's input is a complete cut
    at = pt.activation_patching(model, clean, corrupted, METRIC, point="resid_post",
                                per_position=True, direction="noise")
    assert at.axes == ("layer", "position") and at.scores.shape == (2, 8)
    close(at.scores[1, 7], -gap)  # the last block's output at the answer position
    close(at.scores[:, :2], torch.zeros(2, 2))


# ------------------------------------------------------------------------ path patching
def test_path_patching_every_head_to_the_logits_is_resampling_every_head():
    model = small_lm()
    clean, corrupted = pair()
    every = [(layer, h) for layer in range(2) for h in range(4)]
    value = pt.path_patching(model, clean, corrupted, METRIC, senders=every)
    corrupted_outs = hd.head_outputs(model, lambda: model(corrupted))
    with hd.ablate(model, every, "resample", values=corrupted_outs):
        expected = metric_of(model, clean)
    expected = expected - metric_of(model, clean)
    assert abs(float(expected)) > 1e-3
    close(value, expected)


def frozen_reference(model, clean, corrupted, senders, layers):
    """Path patching's step 2 written with ablate (two contexts to enter): the senders
    resampled from the corrupted run, every other head of ``layers`` from the clean run."""
    clean_outs = hd.head_outputs(model, lambda: model(clean))
    corrupted_outs = hd.head_outputs(model, lambda: model(corrupted))
    others = [(layer, h) for layer in layers for h in range(4) if (layer, h) not in senders]
    return (hd.ablate(model, senders, "resample", values=corrupted_outs),
            hd.ablate(model, others, "resample", values=clean_outs))


def test_path_patching_freezes_every_other_head_on_the_way_to_the_logits():
    model = small_lm()
    clean, corrupted = pair()
    sender = [(0, 1)]
    value = pt.path_patching(model, clean, corrupted, METRIC, senders=sender)
    first, second = frozen_reference(model, clean, corrupted, sender, range(2))
    with first, second:
        expected = metric_of(model, clean)
    expected = expected - metric_of(model, clean)
    close(value, expected)
    # the total effect (layer 1's heads recomputed) differs: the freezing is what is measured
    total = pt.activation_patching(model, clean, corrupted, METRIC, direction="noise")
    assert abs(float(total.scores[0, 1]) - value) > 1e-3
    scores = pt.path_patching_scores(model, clean, corrupted, METRIC)
    assert scores.method == "path patching" and scores.direction == "noise"
    close(scores.scores[0, 1], value)


@pytest.mark.parametrize("via", ["q", "k", "v"])
def test_path_patching_to_a_receiver_head_patches_only_its_chosen_input(via):
    model = small_lm(depth=3)
    clean, corrupted = pair()
    sender, receiver = [(0, 1)], (2, 3)
    value = pt.path_patching(model, clean, corrupted, METRIC, senders=sender,
                             receivers=[receiver], via=via)
    first, second = frozen_reference(model, clean, corrupted, sender, range(3))
    with first, second, hd.capture(model, [f"L2.{via}"]) as cap, torch.no_grad():
        model(clean)
    received = cap[f"L2.{via}"]
    hook_point = getattr(model.blocks[2].attn, f"hook_{via}")

    def patch(_m, _i, out):
        out = out.clone()
        out[:, 3] = received[:, 3]
        return out
    handle = hook_point.register_forward_hook(patch)
    try:
        expected = metric_of(model, clean)
    finally:
        handle.remove()
    expected = expected - metric_of(model, clean)
    assert abs(float(expected)) > 1e-4
    close(value, expected)
    scores = pt.path_patching_scores(model, clean, corrupted, METRIC, receivers=[receiver],
                                     via=via)
    assert scores.scores[2:].isnan().all() and not scores.scores[:2].isnan().any()
    close(scores.scores[0, 1], value)


def test_a_sender_at_or_after_the_receiver_has_no_effect():
    model = small_lm(depth=3)
    clean, corrupted = pair()
    for sender in ([(2, 0)], [(1, 1)]):
        assert pt.path_patching(model, clean, corrupted, METRIC, senders=sender,
                                receivers=[(1, 2)]) == 0.0
    assert pt.path_patching(model, clean, corrupted, METRIC, senders=[(0, 0)],
                            receivers=[(1, 2)]) != 0.0


# ------------------------------------------------------------------------------ bad input
def test_bad_input_gets_clear_errors():
    model = small_lm()
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="same shape"):
        pt.activation_patching(model, clean, corrupted[:, :5], METRIC)
    with pytest.raises(ValueError, match="same keys"):
        pt.activation_patching(model, {"tokens": clean}, {"ids": clean}, METRIC)
    with pytest.raises(ValueError, match="unknown point 'head'"):
        pt.activation_patching(model, clean, corrupted, METRIC, point="head")
    with pytest.raises(ValueError, match="direction must be"):
        pt.activation_patching(model, clean, corrupted, METRIC, direction="both")
    with pytest.raises(ValueError, match=r"layers \[2\] out of range"):
        pt.activation_patching(model, clean, corrupted, METRIC, layers=[0, 2])
    with pytest.raises(ValueError, match="must return a scalar"):
        pt.activation_patching(model, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match="pieces_per_forward"):
        pt.activation_patching(model, clean, corrupted, METRIC, pieces_per_forward=0)
    with pytest.raises(ValueError, match="head 4 out of range in layer 1"):
        pt.path_patching(model, clean, corrupted, METRIC, senders=[(1, 4)])
    with pytest.raises(ValueError, match="layer 5 out of range"):
        pt.path_patching(model, clean, corrupted, METRIC, senders=[(0, 0)],
                         receivers=[(5, 0)])
    with pytest.raises(ValueError, match="via must name"):
        pt.path_patching(model, clean, corrupted, METRIC, senders=[(0, 0)],
                         receivers=[(1, 0)], via="qx")
    with pytest.raises(ValueError, match="receivers must be 'logits'"):
        pt.path_patching(model, clean, corrupted, METRIC, senders=[(0, 0)], receivers="out")
    with pytest.raises(ValueError, match="no head comes before"):
        pt.path_patching_scores(model, clean, corrupted, METRIC, receivers=[(0, 1)])


# --------------------------------------------------------------- Hugging Face models
def hf_pair(name):
    """A tiny random transformers model (from_config, offline) prepared by use_attnlab, and
    clean / corrupted batches (left padding in the second row) that differ at position 5."""
    pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.heads import matrix

    arch = next(a for a in matrix.ARCHITECTURES if a.name == name)
    _, model = matrix.build_pair(arch)
    clean = matrix.inputs(arch)
    corrupted = dict(clean, input_ids=clean["input_ids"].clone())
    corrupted["input_ids"][:, 5] = (corrupted["input_ids"][:, 5] + 7) % matrix.VOCAB
    return model, clean, corrupted


def hf_metric_of(model, inputs):
    with torch.no_grad():
        return METRIC(model(**inputs).logits)


def test_hf_gpt2_head_patching_equals_a_manual_replacement():
    model, clean, corrupted = hf_pair("GPT-2")
    scores = pt.activation_patching(model, clean, corrupted, METRIC, direction="noise")
    assert scores.scores.shape == (2, 4)
    site = hd.sites(model)[1]
    with hd.capture(model, ["L1.heads"]) as cap, torch.no_grad():
        model(**corrupted)

    def replace(_m, _i, out):
        out = out.clone()
        out[:, :, 2] = cap["L1.heads"][:, :, 2]
        return out
    handle = site.hook("heads").register_forward_hook(replace)
    try:
        expected = hf_metric_of(model, clean)
    finally:
        handle.remove()
    close(scores.scores[1, 2], expected - hf_metric_of(model, clean))
    # residual points through heads.points: block 0's input at every position is a cut
    whole = pt.activation_patching(model, clean, corrupted, METRIC, point="resid_pre",
                                   layers=[0], direction="noise")
    assert whole.scores.shape == (2,) and whole.scores[1].isnan()
    close(whole.scores[0], hf_metric_of(model, corrupted) - hf_metric_of(model, clean))


def test_hf_llama_kv_heads_are_patched_and_path_patched_through_their_group():
    model, clean, corrupted = hf_pair("Llama")  # 4 query heads, 2 key/value heads
    scores = pt.activation_patching(model, clean, corrupted, METRIC, point="v")
    assert scores.scores.shape == (2, 2)
    sender, receiver = [(0, 0)], (1, 2)  # query head 2 reads kv head 1
    value = pt.path_patching(model, clean, corrupted, METRIC, senders=sender,
                             receivers=[receiver], via="v")
    clean_outs = hd.head_outputs(model, lambda: model(**clean))
    corrupted_outs = hd.head_outputs(model, lambda: model(**corrupted))
    others = [(layer, h) for layer in range(2) for h in range(4) if (layer, h) != sender[0]]
    with hd.ablate(model, sender, "resample", values=corrupted_outs), \
            hd.ablate(model, others, "resample", values=clean_outs), \
            hd.capture(model, ["L1.v"]) as cap, torch.no_grad():
        model(**clean)

    def replace(_m, _i, out):
        out = out.clone()
        out[:, 1] = cap["L1.v"][:, 1]
        return out
    handle = hd.sites(model)[1].hook("v").register_forward_hook(replace)
    try:
        expected = hf_metric_of(model, clean)
    finally:
        handle.remove()
    expected = expected - hf_metric_of(model, clean)
    assert abs(float(expected)) > 1e-5
    close(value, expected)


# ----------------------------------------------------------------------------- figure
def test_heatmap_writes_png_and_svg_and_refuses_what_it_cannot_draw(tmp_path):
    pytest.importorskip("matplotlib")
    from attnlab.heads.metrics import PatchScores
    from attnlab.heads.patching_figures import patching_heatmap

    values = torch.tensor([[0.5, -0.25, float("nan")], [0.0, 1.0, 0.125]], dtype=torch.float64)
    heads = PatchScores(values, ("layer", "head"), "heads", "activation patching", "denoise",
                        clean=2.0, corrupted=1.0)
    png = patching_heatmap(heads, tmp_path / "heads.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_position = PatchScores(torch.randn(2, 3, 4, dtype=torch.float64),
                               ("layer", "head", "position"), "q", "activation patching",
                               "noise", clean=1.0, corrupted=0.0)
    svg = patching_heatmap(per_position, tmp_path / "sub" / "q.svg", normalised=False,
                           tokens=["a", "b", "c", "d"], title="q by position")
    text = svg.read_text()
    assert "<svg" in text and "q by position" in text
    with pytest.raises(ValueError, match="must end in .png or .svg"):
        patching_heatmap(heads, tmp_path / "heads.jpg")
    with pytest.raises(ValueError, match="4 positions"):
        patching_heatmap(per_position, tmp_path / "q.png", tokens=["a"])
    with pytest.raises(ValueError, match="these scores have none"):
        patching_heatmap(heads, tmp_path / "h.png", tokens=["a"])
    same = PatchScores(values, ("layer", "head"), "heads", "activation patching", "denoise",
                       clean=1.0, corrupted=1.0)
    with pytest.raises(ValueError, match="nothing to normalise by"):
        patching_heatmap(same, tmp_path / "same.png")
