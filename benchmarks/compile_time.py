"""First-call inductor compile time of one mechanism, forward + backward (issue 42).

    python benchmarks/compile_time.py NAME causal|bidirectional
    -> NAME MODE forward_s backward_s total_s max_relative_difference_from_eager

One mechanism per process, so every number is a cold first call (run with
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` to keep inductor's on-disk caches out of it). The
table in docs/bench.md ("Compile") was made with this script; say the machine's load next to
any number it prints.
"""

from __future__ import annotations

import sys
import time

import torch

import attnlab as al


def main(name: str, mode: str) -> None:
    torch.manual_seed(0)
    # mil_attention draws random instance masks in training mode: compare in eval mode
    attn = al.build(name, dim=32, heads=4, causal=mode == "causal").train(
        name != "mil_attention")
    x = torch.randn(2, 13, 32, requires_grad=True)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, :3] = False
    eager = attn(x, mask=keep)
    compiled = torch.compile(attn, fullgraph=True)
    start = time.perf_counter()
    out = compiled(x, mask=keep)
    forward = time.perf_counter()
    out[keep].sum().backward()
    end = time.perf_counter()
    diff = ((out - eager).abs().max() / eager.abs().max().clamp_min(1)).item()
    print(f"{name} {mode} {forward - start:.1f} {end - forward:.1f} {end - start:.1f} "
          f"{diff:.1e}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("causal", "bidirectional"):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
