"""The architecture matrix: which Hugging Face models the microscope runs, checked against
transformers' own ``eager`` attention.

``ARCHITECTURES`` is the table the tests run (tests/heads/test_hf_matrix.py): each row is a
tiny random configuration (2 layers, width 32) of one transformers model class, built twice
from the same weights, once with ``attn_implementation="eager"`` and once prepared by
``use_attnlab``, and run on a padded batch; the outputs must agree within a tolerance derived
from the dtype, or ``use_attnlab`` / the forward must refuse with the row's ``refused``
message. ``python -m attnlab.heads.matrix`` writes docs/microscope-matrix.md from the table;
``--check`` fails when the page differs from what the table gives (a test runs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ARCHITECTURES", "Architecture", "build_pair", "inputs", "outputs", "render",
           "main"]

VOCAB = 97
LENGTH = 10  # longer than every sliding window below, so that the windows matter
DECODER_LENGTH = 6
PAGE = Path(__file__).resolve().parents[3] / "docs" / "microscope-matrix.md"

_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Architecture:
    """One row: ``name`` (as a researcher knows it), the transformers ``config`` and
    ``model`` class names, the tiny config's ``options``, what the row exercises
    (``features``), and ``refused``: None when attnlab must equal eager, else the start of
    the error attnlab must raise."""

    name: str
    config: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    features: str = ""
    refused: str | None = None

    @property
    def encoder_decoder(self) -> bool:
        return "ForConditionalGeneration" in self.model


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("BERT", "BertConfig", "BertModel",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64),
                 "bidirectional encoder, padding mask"),
    Architecture("GPT-2", "GPT2Config", "GPT2LMHeadModel",
                 dict(n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                      scale_attn_by_inverse_layer_idx=True),
                 "causal, fused qkv (Conv1D), learned positions, scale 1 / layer"),
    Architecture("Llama", "LlamaConfig", "LlamaForCausalLM", dict(_DECODER),
                 "GQA 4/2, RoPE, left padding"),
    Architecture("Mistral", "MistralConfig", "MistralForCausalLM",
                 dict(_DECODER, sliding_window=4),
                 "GQA, sliding window 4 (in the mask)"),
    Architecture("Qwen2", "Qwen2Config", "Qwen2ForCausalLM",
                 dict(_DECODER, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1),
                 "GQA, qkv biases, sliding window 4 on layer 1"),
    Architecture("Gemma2", "Gemma2Config", "Gemma2ForCausalLM",
                 dict(_DECODER, head_dim=8, sliding_window=4, attn_logit_softcapping=1.0,
                      final_logit_softcapping=None, initializer_range=0.5),
                 "logit soft-capping 1.0 (dense path), sliding window 4 on alternate layers, "
                 "large weights so that the cap bites"),
    Architecture("Gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
                 dict(_DECODER, head_dim=8, sliding_window=4, sliding_window_pattern=2),
                 "qk-norm, sliding window 4 on alternate layers"),
    Architecture("Phi-3", "Phi3Config", "Phi3ForCausalLM",
                 dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                 "fused qkv projection, GQA"),
    Architecture("Qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=8),
                 "qk-norm, GQA"),
    Architecture("OLMo-2", "Olmo2Config", "Olmo2ForCausalLM", dict(_DECODER),
                 "qk-norm over all heads, GQA"),
    Architecture("gpt-oss", "GptOssConfig", "GptOssForCausalLM",
                 dict(_DECODER, head_dim=8, sliding_window=4, num_local_experts=4,
                      num_experts_per_tok=2),
                 "learned attention sinks (dense path), sliding window 4, MoE"),
    Architecture("Falcon (ALiBi)", "FalconConfig", "FalconForCausalLM",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                      new_decoder_architecture=False, multi_query=False, bos_token_id=1,
                      eos_token_id=2),
                 "ALiBi inside the additive mask (kept as a bias)"),
    Architecture("BART", "BartConfig", "BartForConditionalGeneration",
                 dict(d_model=32, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=2,
                      encoder_ffn_dim=64, decoder_ffn_dim=64),
                 "encoder-decoder, cross-attention, 4 encoder / 2 decoder heads"),
    Architecture("T5", "T5Config", "T5ForConditionalGeneration",
                 dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                 "encoder-decoder, cross-attention, relative position bias (additive)"),
    Architecture("DistilBERT", "DistilBertConfig", "DistilBertModel",
                 dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
                 "bidirectional encoder, padding mask"),
    Architecture("RoBERTa", "RobertaConfig", "RobertaModel",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64),
                 "bidirectional encoder, padding mask"),
    Architecture("OPT", "OPTConfig", "OPTForCausalLM",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                      word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                 "causal, learned positions"),
    Architecture("GPT-NeoX", "GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, bos_token_id=1, eos_token_id=2),
                 "fused qkv, partial RoPE"),
    Architecture("GPT-J", "GPTJConfig", "GPTJForCausalLM",
                 dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, bos_token_id=1,
                      eos_token_id=2),
                 "partial RoPE, parallel block"),
    Architecture("Phi", "PhiConfig", "PhiForCausalLM",
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, bos_token_id=1, eos_token_id=2),
                 "partial RoPE, parallel block"),
    Architecture("Starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM",
                 dict(_DECODER, sliding_window=4, bos_token_id=1, eos_token_id=2),
                 "GQA, sliding window 4"),
    Architecture("Cohere2", "Cohere2Config", "Cohere2ForCausalLM",
                 dict(_DECODER, sliding_window=4, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0),
                 "GQA, sliding window 4 on some layers, parallel block"),
    Architecture("Granite", "GraniteConfig", "GraniteForCausalLM",
                 dict(_DECODER, attention_multiplier=0.3),
                 "GQA, attention multiplier 0.3 as the scale"),
    Architecture("SmolLM3", "SmolLM3Config", "SmolLM3ForCausalLM",
                 dict(_DECODER, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                 "GQA, RoPE skipped on some layers"),
    Architecture("BLOOM", "BloomConfig", "BloomForCausalLM",
                 dict(hidden_size=32, n_layer=2, n_head=4),
                 "ALiBi in its own attention code", refused="BloomForCausalLM has no "
                 "attention module attnlab recognises"),
    Architecture("ModernBERT", "ModernBertConfig", "ModernBertModel",
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, local_attention=4, global_attn_every_n_layers=2,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                      sep_token_id=2),
                 "its attention module has no `scaling` attribute, so attnlab does not find "
                 "it", refused="ModernBertModel has no attention module attnlab recognises"),
)


def _classes(arch: Architecture) -> tuple[Any, Any]:
    from attnlab.integrations.hf import require_transformers

    transformers = require_transformers()
    return getattr(transformers, arch.config), getattr(transformers, arch.model)


def build_pair(arch: Architecture, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(eager model, the same weights prepared by ``use_attnlab``), eval mode, ``dtype``.
    Raises what ``use_attnlab`` raises for a refused architecture."""
    from attnlab.integrations.hf import register, use_attnlab

    register()
    config_class, model_class = _classes(arch)
    config = config_class(vocab_size=VOCAB, **arch.options)
    torch.manual_seed(seed)
    # each model its own config: set_attn_implementation writes into the config
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = model_class._from_config(copy.deepcopy(config), attn_implementation="eager")
    ours.load_state_dict(eager.state_dict())
    eager, ours = eager.to(dtype).eval(), ours.to(dtype).eval()
    return eager, use_attnlab(ours)


def inputs(arch: Architecture, batch: int = 2, seed: int = 1) -> dict[str, Tensor]:
    """A padded batch: the second sequence's first 3 tokens are padding (left padding for a
    decoder, the same for an encoder's source); an encoder-decoder also gets decoder ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, LENGTH), generator=g)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    mask[1, :3] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.encoder_decoder:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, DECODER_LENGTH), generator=g)
    return out


def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's logits (or last hidden state) at the real positions, (N, C)."""
    with torch.no_grad():
        result = model(**batch)
    out = result.logits if getattr(result, "logits", None) is not None \
        else result.last_hidden_state
    if "decoder_input_ids" in batch:
        return out.flatten(0, 1)
    return out[batch["attention_mask"].bool()]


def render(architectures: Sequence[Architecture] = ARCHITECTURES) -> str:
    """The matrix page (markdown) for ``architectures``."""
    lines = [
        "# The microscope on Hugging Face models: the architecture matrix",
        "",
        "<!-- written by `python -m attnlab.heads.matrix` from "
        "attnlab.heads.matrix.ARCHITECTURES; tests/heads/test_hf_matrix.py runs every row "
        "and checks this page with `--check`. Do not edit by hand. -->",
        "",
        "Each row is a tiny random configuration (2 layers, width 32, vocabulary 97) of the "
        "transformers class, built twice from the same weights: once with "
        "`attn_implementation=\"eager\"`, once prepared by `attnlab.integrations.hf."
        "use_attnlab` (attnlab's softmax op, the microscope's hook points). On a padded batch "
        f"of 2 x {LENGTH} tokens (3 padding tokens; encoder-decoders also get "
        f"{DECODER_LENGTH} decoder tokens) the outputs at the real positions must agree in "
        "float32 within 256 x eps x their largest magnitude (tests/tolerances.py), or attnlab "
        "must refuse with the error shown. The test also checks each site's head counts "
        "against the tensors the model passes and that every self-/cross-attention module "
        "got a site.",
        "",
        "| architecture | transformers class | what the tiny config exercises | attnlab vs eager |",
        "|---|---|---|---|",
    ]
    for arch in architectures:
        status = "equal (float32)" if arch.refused is None else \
            f"refused: \"{arch.refused} ...\""
        lines.append(f"| {arch.name} | `{arch.model}` | {arch.features} | {status} |")
    lines += [
        "",
        "What the integration does with the arguments models pass to their attention "
        "function: the mask (boolean, or additive: its finite non-zero part, e.g. Falcon's "
        "ALiBi, is kept as a bias), `scaling`, `dropout` (on the weights, in training), "
        "`softcap` (Gemma 2) and `s_aux` (gpt-oss sinks) through a dense float32 softmax "
        "inside the integration, `position_bias` (T5) as the op's additive bias, "
        "`sliding_window` through the mask (attnlab's mask function is transformers' own, "
        "given the window). Bookkeeping arguments (`position_ids`, `cache_position`, ...) are "
        "ignored, as eager ignores them; any other argument that is not None is refused with "
        "the model's and the argument's names, never dropped.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page (default docs/microscope-matrix.md), or with ``--check`` return 1 and
    say so when it is stale."""
    parser = argparse.ArgumentParser(prog="python -m attnlab.heads.matrix",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if the page differs from the table instead of writing it")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page (default: %(default)s)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m attnlab.heads.matrix", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
