"""The architecture matrix (attnlab.heads.matrix): every row's tiny model through attnlab
equals transformers' eager attention on a padded batch, or is refused with its message; the
docs page is the one the table gives."""

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="needs the hf extra: pip install -e '.[hf]'")

from attnlab import heads as hd  # noqa: E402
from attnlab.heads import matrix  # noqa: E402
from attnlab.integrations import hf  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

ROWS = {arch.name: arch for arch in matrix.ARCHITECTURES}
# the rows that exercise what attnlab adds to the op (softcap, sinks, a bias in the mask, T5's
# position bias, cross-attention with other head counts) run by default; the others (~0.3 s
# each, plain causal or bidirectional softmax, GQA, sliding windows in the mask, covered by
# tests/heads/test_hf.py and test_hf_correctness.py too) are slow
DEFAULT = {"Gemma2", "gpt-oss", "Falcon (ALiBi)", "BART", "T5"}


@pytest.mark.parametrize("name", [
    pytest.param(a.name, marks=() if a.name in DEFAULT else pytest.mark.slow)
    for a in matrix.ARCHITECTURES if a.refused is None])
def test_architecture_through_attnlab_equals_eager(name):
    arch = ROWS[name]
    eager, ours = matrix.build_pair(arch)
    batch = matrix.inputs(arch)
    expected = matrix.outputs(eager, batch)
    assert_close(matrix.outputs(ours, batch), expected, msg=name)
    assert ours.config._attn_implementation == "attnlab_softmax"
    assert eager.config._attn_implementation == "eager"
    model_sites = hd.sites(ours)
    assert len(model_sites) == len(hf.attention_modules(ours))
    # the sites' head counts are the ones the model passes (checked in every call: a wrong
    # count raises), and the weights path gives the same outputs as the op path
    with torch.no_grad(), hd.capture(ours, [f"L{s.layer}.weights" for s in model_sites]) as cap:
        through_weights = matrix.outputs(ours, batch)
    assert_close(through_weights, expected, msg=f"{name}, weights path")
    for s in model_sites:
        assert cap[f"L{s.layer}.weights"].shape[1] == s.heads
    kinds = [s.kind for s in model_sites]
    assert ("cross" in kinds) == arch.encoder_decoder


@pytest.mark.parametrize("name", [a.name for a in matrix.ARCHITECTURES if a.refused])
def test_architecture_is_refused_with_a_clear_error(name):
    arch = ROWS[name]
    with pytest.raises(ValueError, match=arch.refused):
        eager, ours = matrix.build_pair(arch)
        matrix.outputs(ours, matrix.inputs(arch))


def test_the_matrix_page_is_generated_from_the_table(tmp_path, capsys):
    assert matrix.main(["--check"]) == 0, "run python -m attnlab.heads.matrix"
    page = tmp_path / "page.md"
    page.write_text(matrix.render().replace("Gemma2", "Gemma 2"))
    assert matrix.main(["--check", "--out", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert matrix.main(["--out", str(page)]) == 0
    assert matrix.main(["--check", "--out", str(page)]) == 0
