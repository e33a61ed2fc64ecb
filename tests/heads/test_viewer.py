"""The attention-pattern viewer (attnlab.heads.viewer): the page holds the weights it was
given (to its one-byte storage), leaves padding out, escapes hostile tokens, needs no network,
refuses what it cannot show; and in a real headless Chromium it renders its maps, logs nothing
and passes its own click and hover self-test (skipped only where no Chromium is installed)."""

import base64
import json
import os
import re

import pytest
import torch

from attnlab import heads as hd
from attnlab.heads import viewer
from attnlab.models.transformer_lm import TransformerLM
from tests.tolerances import eps

HOSTILE = "</script><img src=x onerror=alert(1)>"
# CI sets ATTNLAB_REQUIRE_BROWSER=1 after installing Chromium: then a missing browser fails
# the browser tests instead of skipping them
NEEDS_BROWSER = pytest.mark.skipif(
    viewer.find_browser() is None and not os.environ.get("ATTNLAB_REQUIRE_BROWSER"),
    reason="needs a headless Chromium: apt-get install -y chromium (Debian/Ubuntu)")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(40, dim=32, depth=2, heads=4).eval()


def tiny_capture(model, length: int = 10, batch: int = 2):
    """A random 2-layer, 4-head attnlab LM's captured weights on random tokens."""
    x = torch.randint(0, 40, (batch, length))
    with torch.no_grad(), hd.capture(model, ["L0.weights", "L1.weights", "L1.heads"]) as cap:
        model(x)
    return cap


def decoded(data: dict, layer_index: int, head_index: int) -> torch.Tensor:
    """A page's stored map of one head, back as weights (Lq, Lk)."""
    raw = base64.b64decode(data["layers"][layer_index]["maps"][head_index])
    levels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float()
    w = data["lo"] + levels / viewer.LEVELS * (data["hi"] - data["lo"])
    return w.view(len(data["queries"]), len(data["keys"]))


def embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert m, "no data block in the page"
    return json.loads(m.group(1))


def storage_error(data: dict) -> float:
    """Half a storage level, plus float32 rounding of the level arithmetic."""
    span = data["hi"] - data["lo"]
    return span / (2 * viewer.LEVELS) + 4 * eps(torch.float32) * span


def test_page_holds_the_captured_weights(tmp_path, model):
    cap = tiny_capture(model)
    tokens = [f"tok{i}" for i in range(10)]
    path = viewer.attention_page(cap, tokens, tmp_path / "page.html", item=1, title="tiny")
    data = embedded(path.read_text(encoding="utf-8"))
    assert data == viewer.page_data(cap, tokens, item=1, title="tiny")
    assert [entry["layer"] for entry in data["layers"]] == [0, 1]  # L1.heads is not a map
    assert data["queries"] == data["keys"] == tokens
    assert (data["lo"], data["hi"]) == (0.0, 1.0)
    for li, layer in enumerate((0, 1)):
        assert data["layers"][li]["heads"] == [0, 1, 2, 3]
        for h in range(4):
            expected = cap[f"L{layer}.weights"][1, h]
            assert (decoded(data, li, h) - expected).abs().max() <= storage_error(data)


def test_uneven_heads_selection_and_padding():
    """Layers with 4 and 2 heads, a {layer: heads} choice, left padding left out: padded keys
    and queries (whose rows hold NaN here) are dropped with key_mask."""
    torch.manual_seed(1)
    length, pad = 8, 3
    maps = {0: torch.rand(2, 4, length, length).softmax(-1),
            "L2.weights": torch.rand(2, 2, length, length).softmax(-1)}
    maps[0][1, :, :pad] = float("nan")  # sequence 1: the padding queries' rows
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    tokens = ["<pad>"] * pad + [f"w{i}" for i in range(length - pad)]
    data = viewer.page_data(maps, tokens, heads={0: [3, 1], 2: [1]}, item=1, key_mask=mask)
    assert [(entry["layer"], entry["heads"]) for entry in data["layers"]] == [(0, [3, 1]),
                                                                             (2, [1])]
    assert data["keys"] == tokens[pad:]
    for li, (key, heads) in enumerate(((0, [3, 1]), ("L2.weights", [1]))):
        for hi, h in enumerate(heads):
            expected = maps[key][1, h, pad:, pad:]
            assert (decoded(data, li, hi) - expected).abs().max() <= storage_error(data)
    # the real tokens alone are accepted too, and every head of layer 0 by default
    data = viewer.page_data(maps, tokens[pad:], layers=[0], item=1, key_mask=mask[1])
    assert data["layers"][0]["heads"] == [0, 1, 2, 3] and len(data["keys"]) == length - pad
    with pytest.raises(ValueError, match="non-finite weights.*key_mask"):
        viewer.page_data(maps, tokens, item=1)


def test_hostile_tokens_and_title_are_escaped(tmp_path, model):
    cap = tiny_capture(model, length=6, batch=1)
    tokens = [HOSTILE, "<!--", "a&b", '"q"\n', "\u2028", "__TITLE__"]
    title = "<b>bold</b> </script> __DATA__"
    page = viewer.attention_page(cap, tokens, tmp_path / "p.html",
                                 title=title).read_text(encoding="utf-8")
    assert page.count("</script>") == 3  # the error trap, the data block, the viewer
    assert "<img" not in page and "<!--" not in page and "<b>" not in page
    data = embedded(page)
    assert data["keys"] == tokens and data["title"] == title


def test_page_needs_no_network(tmp_path, model):
    page = viewer.attention_page(tiny_capture(model, length=4, batch=1), list("abcd"),
                                 tmp_path / "p.html").read_text(encoding="utf-8")
    for remote in ("http:", "https:", "//cdn", "<link", "@import", "url(", "src="):
        assert remote not in page


def test_cross_attention_and_a_decoding_step():
    keys = ["k0", "k1", "k2", "k3", "k4"]
    cross = torch.rand(1, 2, 3, 5).softmax(-1)
    data = viewer.page_data({5: cross}, keys, query_tokens=["q0", "q1", "q2"])
    assert data["queries"] == ["q0", "q1", "q2"] and data["keys"] == keys
    step = torch.rand(1, 2, 1, 5).softmax(-1)  # one query with a cache: the last token
    assert viewer.page_data(step, keys)["queries"] == ["k4"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda cap: viewer.page_data(cap, ["a"] * 9), "has 10 keys but 9 tokens"),
    (lambda cap: viewer.page_data(cap, ["a"] * 10, item=2), "item 2 out of range"),
    (lambda cap: viewer.page_data(cap, ["a"] * 10, heads=[4]), "head 4 out of range"),
    (lambda cap: viewer.page_data(cap, ["a"] * 10, layers=[3]), "layer 3 has no weights"),
    (lambda cap: viewer.page_data(cap, ["a"] * 10, max_cells=100), "choose fewer layers"),
    (lambda cap: viewer.page_data(cap["L0.weights"][0, 0], ["a"] * 10), r"\(B, H, Lq, Lk\)"),
    (lambda cap: viewer.page_data({0: torch.rand(1, 1, 3, 3), 1: torch.rand(1, 1, 2, 3)},
                                  list("abc")), "one page shows layers of one shape"),
    (lambda cap: viewer.page_data(torch.rand(1, 1, 4, 3), list("abc")), "query_tokens="),
])
def test_what_cannot_be_shown_is_refused_clearly(call, message, model):
    with pytest.raises(ValueError, match=message):
        call(tiny_capture(model))


def test_a_capture_without_weights_is_refused(model):
    with torch.no_grad(), hd.capture(model, ["L0.heads"]) as cap:
        model(torch.randint(0, 40, (1, 5)))
    with pytest.raises(ValueError, match="holds no attention weights.*L0.heads"):
        viewer.page_data(cap, list("abcde"))


def test_the_size_of_a_4_layer_8_head_128_token_page(tmp_path):
    """One byte a weight in base64: 4 x 8 x 128 x 128 weights make a page of about 0.7 MB
    (the number the module's docstring states)."""
    maps = [torch.randn(1, 8, 128, 128).softmax(-1) for _ in range(4)]
    path = viewer.attention_page(maps, [f"t{i}" for i in range(128)], tmp_path / "big.html")
    size = path.stat().st_size
    assert 4 * 8 * 128 * 128 * 4 / 3 < size < 0.75e6


def test_hugging_face_capture_with_left_padding():
    """A random Llama (GQA, left padding): the page of the padded sequence holds its real
    queries x real keys, each row a distribution."""
    pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.heads import matrix

    arch = next(a for a in matrix.ARCHITECTURES if a.name == "Llama")
    _, model = matrix.build_pair(arch)
    batch = matrix.inputs(arch)
    model_sites = hd.sites(model)
    with torch.no_grad(), hd.capture(model, [f"L{s.layer}.weights" for s in model_sites]) as cap:
        model(**batch)
    tokens = [f"id{i}" for i in batch["input_ids"][1].tolist()]
    data = viewer.page_data(cap, tokens, item=1, key_mask=batch["attention_mask"])
    real = int(batch["attention_mask"][1].sum())
    assert len(data["keys"]) == real < len(tokens) and data["keys"] == tokens[-real:]
    for li, s in enumerate(model_sites):
        assert data["layers"][li]["heads"] == list(range(s.heads))
        for h in range(s.heads):
            w = decoded(data, li, h)
            expected = cap[f"L{s.layer}.weights"][1, h, -real:, -real:]
            assert (w - expected).abs().max() <= storage_error(data)
            assert torch.equal(w.triu(1), torch.zeros_like(w))  # causal: no future keys


@pytest.mark.slow
def test_hugging_face_encoder_decoder_pages():
    """BART (4 encoder, 2 decoder heads): a page of the encoder's self-attention (padding
    left out), one of the cross-attention (decoder queries x encoder keys) and one of the
    decoder's self-attention; mixing shapes on one page is refused."""
    pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
    from attnlab.heads import matrix

    arch = next(a for a in matrix.ARCHITECTURES if a.name == "BART")
    _, model = matrix.build_pair(arch)
    batch = matrix.inputs(arch)
    model_sites = hd.sites(model)
    with torch.no_grad(), hd.capture(model, [f"L{s.layer}.weights" for s in model_sites]) as cap:
        model(**batch)
    encoder = [s.layer for s in model_sites if ".encoder." in s.path]
    cross = [s.layer for s in model_sites if s.kind == "cross"]
    decoder = [s.layer for s in model_sites if s.kind == "self" and ".decoder." in s.path]
    assert encoder and cross and decoder
    source = [f"s{i}" for i in range(matrix.LENGTH)]
    target = [f"t{i}" for i in range(matrix.DECODER_LENGTH)]
    real = int(batch["attention_mask"][1].sum())
    pages = {
        "encoder": (viewer.page_data(cap, source, layers=encoder, item=1,
                                     key_mask=batch["attention_mask"]), slice(-real, None),
                    slice(-real, None)),
        "cross": (viewer.page_data(cap, source, layers=cross, item=1,
                                   key_mask=batch["attention_mask"], query_tokens=target),
                  slice(None), slice(-real, None)),
        "decoder": (viewer.page_data(cap, target, layers=decoder, item=1), slice(None),
                    slice(None)),
    }
    for name, (data, rows, cols) in pages.items():
        for li, entry in enumerate(data["layers"]):
            heads = model_sites[entry["layer"]].heads
            assert entry["heads"] == list(range(heads)), name
            assert heads == (4 if name == "encoder" else 2), name
            for h in range(heads):
                expected = cap[f"L{entry['layer']}.weights"][1, h][rows, cols]
                assert (decoded(data, li, h) - expected).abs().max() <= storage_error(data)
    assert pages["cross"][0]["queries"] == target and pages["cross"][0]["keys"] == source[-real:]
    with pytest.raises(ValueError, match="one page shows layers of one shape"):
        viewer.page_data(cap, source, layers=encoder + cross, item=1,
                         key_mask=batch["attention_mask"], query_tokens=target)


# --- in a real browser -------------------------------------------------------------------


def browser_page(tmp_path, model):
    cap = tiny_capture(model, length=12, batch=1)
    tokens = [f"t{i}" for i in range(12)]
    tokens[3], tokens[5] = HOSTILE, 'a&b "q"\n'
    maps = {0: cap["L0.weights"], 1: cap["L1.weights"][:, :2]}  # 4 and 2 heads
    return viewer.attention_page(maps, tokens, tmp_path / "page.html", title="tiny LM")


@NEEDS_BROWSER
def test_the_page_renders_and_passes_its_self_test_in_chromium(tmp_path, model):
    page = browser_page(tmp_path, model)
    result = viewer.render_page(page, tmp_path / "page.png")
    assert result.problems() == []
    assert result.selftest is not None and set(result.selftest["checks"]) == {
        "tokens_shown", "layer_switch", "click_enlarges", "cell_hover", "token_hover"}
    assert "<img" not in result.dom  # the hostile token stayed text


def planted(page, old: str, new: str):
    text = page.read_text(encoding="utf-8")
    assert old in text
    page.write_text(text.replace(old, new, 1), encoding="utf-8")
    return page


@pytest.mark.slow
@NEEDS_BROWSER
def test_the_browser_check_catches_a_script_error(tmp_path, model):
    page = planted(browser_page(tmp_path, model), '"use strict";', '"use strict"; null.planted;')
    problems = viewer.render_page(page, tmp_path / "page.png").problems()
    assert any("console: Uncaught TypeError" in p for p in problems), problems
    assert any("page error:" in p for p in problems), problems
    assert any("self-test did not run" in p for p in problems), problems


@pytest.mark.slow
@NEEDS_BROWSER
def test_the_browser_check_catches_a_blank_render(tmp_path, model):
    page = planted(browser_page(tmp_path, model), "  ctx.putImageData(img, 0, 0);\n", "")
    result = viewer.render_page(page, tmp_path / "page.png")
    assert result.selftest is not None and result.selftest["ok"]  # it ran; nothing was drawn
    assert [p for p in result.problems() if p.startswith("blank render")], result.problems()


def test_heads_view_command_writes_a_page_and_refuses_bad_layers(tmp_path):
    """`attnlab heads view` on the bundled MiniLM: one page with the sentence's tokens; a layer
    the model does not have is a usage error naming the layers it has."""
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from attnlab.cli import main

    page = tmp_path / "view.html"
    args = ["heads", "view", "--model", "minilm", "--text", "The cat sat.", "--out", str(page)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "[CLS]" in html and "cat" in html and "page:" in result.output
    bad = CliRunner().invoke(main, [*args, "--layers", "9"])
    assert bad.exit_code == 2 and "layer 9" in bad.output
