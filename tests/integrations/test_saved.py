"""``attnlab.integrations.saved``: a converted model saved and loaded back gives bitwise the
same outputs (GPT-2 with its tied embedding, Llama with RoPE and GQA, BERT with its output
dense folded in), after attention transfer moved its new parameters, with mechanism
arguments that change the outputs but no shape, with merged and unmerged LoRA; a source
checkpoint that is gone or differs is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from attnlab.integrations.convert import convert, new_parameters, teacher  # noqa: E402
from attnlab.integrations.distill import attention_transfer, teacher_mode  # noqa: E402
from attnlab.integrations.saved import (  # noqa: E402
    load_converted,
    read_converted,
    save_converted,
)
from tests.integrations.test_distill import batches  # noqa: E402
from tests.integrations.tiny import build, inputs, outputs  # noqa: E402


def source(name: str, folder: Path) -> tuple[nn.Module, Path]:
    """The tiny ``name`` written with save_pretrained to ``folder`` and read back (the model
    a user converts: loaded from the checkpoint)."""
    tiny = build(name)
    tiny.save_pretrained(folder)
    model = type(tiny).from_pretrained(folder, local_files_only=True)
    return model.eval(), folder


def same(a: nn.Module, b: nn.Module) -> None:
    ids, mask = inputs()
    with torch.no_grad():
        x, y = outputs(a, ids, mask), outputs(b, ids, mask)
    assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("name", [pytest.param("GPT-2", marks=pytest.mark.slow), "Llama",
                                  pytest.param("BERT", marks=pytest.mark.slow)])
def test_saved_after_transfer_loads_bitwise(name: str, tmp_path: Path) -> None:
    model, folder = source(name, tmp_path / "src")
    torch.manual_seed(3)
    convert(model, "hedgehog")
    initial = {n: p.detach().clone() for n, p in new_parameters(model).items()}
    attention_transfer(model, batches(1, 0), loss="hedgehog", steps=1, lr=1e-2,
                       progress=False)
    assert any(not torch.equal(p, initial[n]) for n, p in new_parameters(model).items())
    save_converted(model, tmp_path / "out", {"source": str(folder), "kwargs": {}, "seed": 3,
                                             "distill": {"loss": "hedgehog", "steps": 1}})
    saved = read_converted(tmp_path / "out")
    assert saved["mechanism"] == "hedgehog" and saved["recipe"]["distill"]["steps"] == 1
    if name == "GPT-2":  # the tied embedding is stored once
        assert saved["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_converted(tmp_path / "out")
    same(model, loaded)
    for n, p in new_parameters(loaded).items():
        assert torch.equal(p, new_parameters(model)[n])
    # the teacher is the source model's attention: the frozen pass is the unconverted model
    with teacher_mode(loaded):
        same(loaded, type(model).from_pretrained(folder, local_files_only=True).eval())


def test_mechanism_arguments_are_saved(tmp_path: Path) -> None:
    """linear attention with the relu feature map has no parameters of its own: only the
    saved kwargs tell it from the default elu+1. GPT-2: its tied embedding is stored once."""
    model, folder = source("GPT-2", tmp_path / "src")
    convert(model, "linear", feature_map="relu")
    save_converted(model, tmp_path / "out", {"source": str(folder),
                                             "kwargs": {"feature_map": "relu"}})
    assert read_converted(tmp_path / "out")["aliases"] == {
        "lm_head.weight": "transformer.wte.weight"}
    same(model, load_converted(tmp_path / "out"))


def test_refusals(tmp_path: Path) -> None:
    model, folder = source("GPT-2", tmp_path / "src")
    with pytest.raises(ValueError, match="no converted attention"):
        save_converted(model, tmp_path / "x", {"source": str(folder), "kwargs": {}})
    convert(model, "hedgehog")
    with pytest.raises(ValueError, match="needs kwargs"):
        save_converted(model, tmp_path / "x", {"source": str(folder)})
    with pytest.raises(ValueError, match="runs 'hedgehog'"):
        save_converted(model, tmp_path / "x", {"source": str(folder), "kwargs": {},
                                               "mechanism": "linear"})
    with pytest.raises(FileNotFoundError, match="no such folder"):
        save_converted(model, tmp_path / "x", {"source": str(tmp_path / "nope"),
                                               "kwargs": {}})
    build("Llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="'llama' checkpoint, the model a 'gpt2'"):
        save_converted(model, tmp_path / "x", {"source": str(tmp_path / "llama"),
                                               "kwargs": {}})
    save_converted(model, tmp_path / "out", {"source": str(folder), "kwargs": {}})
    # a source of another width: the tensors that do not fit are named
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match="which is gone"):
        load_converted(tmp_path / "out")
    build("GPT-2", n_embd=48).save_pretrained(folder)
    with pytest.warns(UserWarning, match="fields changed: .*n_embd 32 -> 48"), \
            pytest.raises(ValueError, match=r"other shapes: .*saved \(97, 32\), rebuilt "
                                            r"\(97, 48\)"):
        load_converted(tmp_path / "out")
    # the source's config.json changed under its weights: the tensors are named, both shapes
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    with pytest.warns(UserWarning, match="config.json is not the one"), \
            pytest.raises(ValueError, match=r"its weights do not fit its config.json \(.*"
                                            r"c_attn.weight saved \(48, 144\), config gives "
                                            r"\(32, 96\).*\(\+23 more\)"):
        load_converted(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no convert.json"):
        load_converted(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope: no such folder"):
        load_converted(tmp_path / "nope")


@pytest.mark.slow
def test_merged_lora_keeps_the_teacher(tmp_path: Path) -> None:
    """Merged LoRA changes Llama's pretrained q, k, v, o, which the teacher shares at
    conversion: the loaded model has the merged weights and its teacher the source's."""
    pytest.importorskip("peft")
    from attnlab.integrations.finetune import finetune, merge_lora

    model, folder = source("Llama", tmp_path / "src")
    convert(model, "hedgehog")
    finetune(model, batches(2, 0), objective="logits", lora=2, steps=2, lr=1e-2,
             progress=False)
    merge_lora(model)
    save_converted(model, tmp_path / "out", {"source": str(folder), "kwargs": {}})
    assert read_converted(tmp_path / "out")["lora"] is None
    loaded = load_converted(tmp_path / "out")
    same(model, loaded)
    first = loaded.model.layers[0].self_attn
    original = type(model).from_pretrained(folder, local_files_only=True)
    assert torch.equal(teacher(first).q_proj.weight,
                       original.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(first.attn.qkv.q.weight, teacher(first).q_proj.weight)


@pytest.mark.slow
def test_unmerged_lora_is_restored(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from attnlab.integrations.finetune import finetune, lora_parameters

    model, folder = source("GPT-2", tmp_path / "src")
    convert(model, "hedgehog")
    finetune(model, batches(2, 0), objective="logits", lora=2, steps=2, lr=1e-2,
             progress=False)
    save_converted(model, tmp_path / "out", {"source": str(folder), "kwargs": {}})
    saved = json.loads((tmp_path / "out" / "convert.json").read_text())
    assert saved["lora"]["rank"] == 2 and len(saved["lora"]["modules"]) == 8
    loaded = load_converted(tmp_path / "out")
    assert set(lora_parameters(loaded)) == set(lora_parameters(model))
    same(model, loaded)
