"""Regenerate the README's generated blocks from their sources.

    python scripts/update_readme.py            # mechanisms table + benchmark summary

Blocks sit between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``:
``mechanisms`` from the registry, ``bench``, ``bench-linear`` and ``bench-local-*`` from
``benchmarks/results/scored_ops-*.md``, ``linear_family-*.md`` and ``local_*-*.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {name} block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def bench_summary(name: str, config: str, against: str = "SDPA softmax") -> str:
    """The throughput and memory tables of benchmarks/results/<name>-*.md, with their source."""
    results = sorted((ROOT / "benchmarks" / "results").glob(f"{name}-*.md"))
    if not results:
        return f"No benchmark recorded yet: run `python benchmarks/bench_{name}.py`."
    src = results[-1]
    text = src.read_text()
    machine = next(line for line in text.splitlines() if line.startswith("Machine:"))
    table = text.split("## Throughput", 1)[1].split("\n\n", 2)[1]
    memory = text.split("## Peak extra memory", 1)[1].split("\n\n", 2)[1]
    rel = src.relative_to(ROOT).as_posix()
    return (f"{config} ({machine[9:].strip().rstrip('.')}); tokens/s and the ratio to "
            f"{against}. From [{rel}]({rel}):\n\n{table}\n\n"
            f"Peak extra memory (MB) and its fitted growth exponent in L:\n\n{memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.parse_args()
    from attnlab.cli import registry_markdown

    text = README.read_text()
    text = replace_block(text, "mechanisms", registry_markdown())
    text = replace_block(text, "bench", bench_summary(
        "scored_ops", "Forward + backward, causal, batch 1, 8 heads, head dim 64"))
    text = replace_block(text, "bench-linear", bench_summary(
        "linear_family", "Whole modules, forward + backward, dim 512, 8 heads, batch 1; ratios "
        "against softmax in the same mode (causal or bidirectional)"))
    for mode, what in (("forward", "Inference (forward only)"),
                       ("train", "Training (forward + backward)")):
        text = replace_block(text, f"bench-local-{mode}", bench_summary(
            f"local_{mode}", f"{what}; ops at B=1, H=8, D=64, modules at dim 512, 8 heads",
            against="each case's baseline (neighborhood: the dense masked SDPA; maxvit, dma: "
                    "the softmax module in the same mode)"))
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
