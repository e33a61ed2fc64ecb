"""Greedy generation of a converted Llama with and without the cache, wall-clock.

A random-initialised LlamaForCausalLM (built offline from a config: hidden 256, 4 layers, 4
query and 2 key/value heads of width 64, MLP 688, vocabulary 1024) is converted with
``attnlab.integrations.convert.convert`` to each mechanism, then generates ``--new`` tokens
greedily after a ``--prompt``-token prompt (``min_new_tokens`` = ``max_new_tokens``, so every
run generates the same number), with ``use_cache=True`` (each layer's attnlab state in
transformers' DynamicCache: the model sees one new token per step) and ``use_cache=False``
(every step recomputes the whole sequence). The unconverted model with its own KV cache is
the reference row. Reported: the median wall-clock time of ``--repeats`` runs (after one
warm-up run), milliseconds per generated token, the speed-up of the cache, and whether the
cached run generated the same tokens as the recomputation; the machine line gives the load
average at the end and at the start of the run (other jobs make the numbers noisy).

Usage (from the repository root)::

    python benchmarks/convert_generate.py [--new 256] [--prompt 32] [--repeats 3]
        [--threads N] [--mechanisms softmax linear hedgehog] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

CONFIG: dict[str, Any] = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
              max_position_embeddings=2048, initializer_range=0.05)


def build() -> Any:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    return model


def timed(model: Any, prompt: torch.Tensor, new: int, use_cache: bool,
          repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` greedy generations (after a warm-up), and the tokens."""
    options: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   pad_token_id=0, use_cache=use_cache)
    with torch.inference_mode():
        out = model.generate(prompt, **options)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            again = model.generate(prompt, **options)
            times.append(time.perf_counter() - start)
    assert torch.equal(out, again)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=256, help="tokens to generate")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mechanisms", nargs="+", default=["softmax", "linear", "hedgehog"])
    parser.add_argument("--out", default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from attnlab.integrations.convert import convert

    load_before = os.getloadavg()  # other jobs on the machine: recorded at both ends
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, CONFIG["vocab_size"], (1, args.prompt), generator=gen)
    rows: list[tuple[str, str, float, float | None, bool | None]] = []
    original = build()
    seconds, _ = timed(original, prompt, args.new, True, args.repeats)
    rows.append(("unconverted (transformers KV cache)", "-", seconds, None, None))
    for mechanism in args.mechanisms:
        model = convert(build(), mechanism)
        cached, tokens = timed(model, prompt, args.new, True, args.repeats)
        full, recomputed = timed(model, prompt, args.new, False, args.repeats)
        rows.append((mechanism, "use_cache=True", cached, full / cached,
                     torch.equal(tokens, recomputed)))
        rows.append((mechanism, "use_cache=False", full, None, None))
    load = os.getloadavg()
    lines = [
        "# Greedy generation of a converted Llama: use_cache=True vs False",
        "",
        "Command (from the repository root):",
        "",
        "    python " + " ".join(["benchmarks/convert_generate.py", *sys.argv[1:]]),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"float32; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; at the start "
        f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}).",
        "",
        f"Model: LlamaForCausalLM from a config ({CONFIG}), random weights (seed 0), "
        f"converted with attnlab.integrations.convert.convert; prompt {args.prompt} tokens, "
        f"{args.new} new tokens, greedy; median of {args.repeats} runs after a warm-up.",
        "",
        "| mechanism | generate | seconds | ms / token | cache speed-up | same tokens |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, how, seconds, speedup, same in rows:
        lines.append(f"| {name} | {how} | {seconds:.2f} | {1e3 * seconds / args.new:.1f} | "
                     f"{'' if speedup is None else f'{speedup:.1f}x'} | "
                     f"{'' if same is None else ('yes' if same else 'NO')} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
