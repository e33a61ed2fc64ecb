"""Groups (contestants measured side by side on one workload shape, against one baseline) and
the named suites that run them; the issue's performance targets, checked on every report."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from attnlab.bench.contestants import OPS, Contestant, module_contestant
from attnlab.bench.workload import TRAIN_FLOP_FACTOR, Workload


@dataclass(frozen=True)
class Group:
    name: str
    description: str
    contestants: tuple[str, ...]
    baseline: str
    inputs: str = "op"  # "op": q, k, v; "module": x (B, L, dim)
    shape: dict = field(default_factory=dict)  # Workload fields this group sets
    axis: str = "length"  # the Workload field its tables, curves and exponents run over

    def contestant(self, name: str) -> Contestant:
        if self.inputs == "module":
            return module_contestant(name.split("/")[0])
        return OPS[name]

    def flops(self, w: Workload) -> float | None:
        """Nominal matmul FLOPs of the math (not of an implementation): 4 B H Lq Lk_seen D for
        attention, 4 B H L D^2 for linear attention; x3.5 for training. None for modules."""
        if self.inputs == "module":
            return None
        b, h, n, d = w.batch, w.heads, w.length, w.head_dim
        work: float
        if self.name == "decode":
            work = 4 * b * h * n * d
        elif self.name == "linear":
            work = 4 * b * h * n * d * d
        elif self.name.startswith("neighborhood"):
            work = 4 * b * h * n * w.kernel * d
        else:
            seen = (n + 1) / 2 if w.causal else n
            work = 4 * b * h * n * seen * d
        return work * (TRAIN_FLOP_FACTOR if w.train else 1.0)


CAUSAL_MODULES = ("softmax", "sigmoid", "softplus", "gated", "selective", "linear", "mala",
                  "inline", "hedgehog", "rfa", "dma", "longheads", "sparsifiner", "moh",
                  "neighborhood", "cca", "rcmha", "lla")
BIDIRECTIONAL_MODULES = ("softmax", "agent", "soft", "l2vit", "mala", "inline", "maxvit",
                         "gaam", "spectral", "linear")

GROUPS = {g.name: g for g in (
    Group("scored", "Scored softmax alternatives, causal, (B, H, L, D) = (1, 8, L, 64), "
          "against SDPA softmax. sigmoid: sum_j sigmoid(s_ij - log L) v_j; lssa/lssar: the "
          "softplus mechanisms; attnlab-fp32-gemm (bf16 only): attnlab's sigmoid on float32 "
          "copies of the inputs (on the CPU the op's own path since its GEMMs on cache-sized "
          "tiles run in float32)",
          ("softmax/sdpa", "softmax/flex", "sigmoid/attnlab", "sigmoid/attnlab-triton",
           "sigmoid/attnlab-fp32-gemm", "sigmoid/flex",
           "sigmoid/x-transformers", "sigmoid/dense", "lssa/attnlab", "lssar/attnlab"),
          "softmax/sdpa"),
    Group("neighborhood", "1-D neighborhood attention, K = 128, (1, 8, L, 64), against the "
          "same neighborhoods as a dense boolean mask through SDPA (ideal speed-up L / K)",
          ("neighborhood/sdpa-masked", "neighborhood/attnlab", "neighborhood/flex",
           "neighborhood/natten"),
          "neighborhood/sdpa-masked", shape={"causal": False, "kernel": 128}),
    Group("neighborhood-k", "1-D neighborhood attention over window sizes K at a fixed L, "
          "(1, 8, L, 64), against the same neighborhoods as a dense boolean mask through SDPA "
          "(ideal speed-up L / K)",
          ("neighborhood/sdpa-masked", "neighborhood/attnlab", "neighborhood/flex",
           "neighborhood/natten"),
          "neighborhood/sdpa-masked", shape={"causal": False}, axis="kernel"),
    Group("linear", "Causal linear attention (phi = elu + 1, normalised), (1, 8, L, 64), "
          "against SDPA softmax", ("softmax/sdpa", "linear/attnlab", "linear/attnlab-triton",
                                   "linear/fla"),
          "softmax/sdpa"),
    Group("decode", "One query over a KV cache of L positions, GQA 8 query / 2 kv heads, "
          "D = 64, against one batched matmul over the cache",
          ("decode/matmul", "decode/attnlab", "decode/attnlab-triton", "decode/sdpa-repeat-kv",
           "decode/sdpa-gqa"),
          "decode/matmul", shape={"kv_heads": 2, "causal": False}),
    # compute-bound shapes for a GPU (issue 36): enough heads and batch that the GEMMs, not
    # the launches, set the time; the "-d128" variant at head dim 128
    Group("scored-large", "Compute-bound scored attention, causal, (B, H, L, D) = (4, 16, L, "
          "64), against SDPA softmax (FA2 / cuDNN on a GPU)",
          ("softmax/sdpa", "softmax/flex", "sigmoid/attnlab", "sigmoid/attnlab-triton",
           "sigmoid/flex", "lssa/attnlab", "lssa/attnlab-triton", "lssar/attnlab",
           "lssar/attnlab-triton"),
          "softmax/sdpa", shape={"batch": 4, "heads": 16, "kv_heads": 16}),
    Group("scored-large-d128", "Compute-bound scored attention, causal, (4, 16, L, 128), "
          "against SDPA softmax",
          ("softmax/sdpa", "softmax/flex", "sigmoid/attnlab-triton", "sigmoid/flex",
           "lssa/attnlab-triton", "lssar/attnlab-triton"),
          "softmax/sdpa", shape={"batch": 4, "heads": 16, "kv_heads": 16, "head_dim": 128}),
    Group("neighborhood-large", "1-D neighborhood attention, (1, 16, L, 128), window K, "
          "against SDPA full (non-causal) attention of the same length: the ideal speed-up is "
          "the FLOP ratio L / K (NATTEN's Hopper kernel: 8.3x of 16x at L = 32k, K = 2k)",
          ("softmax/sdpa", "neighborhood/attnlab", "neighborhood/attnlab-triton",
           "neighborhood/flex"),
          "softmax/sdpa", shape={"heads": 16, "kv_heads": 16, "head_dim": 128, "causal": False}),
    Group("linear-large", "Compute-bound causal linear attention (elu + 1, normalised), "
          "(4, 16, L, 64), against SDPA softmax, with fla's chunk kernel",
          ("softmax/sdpa", "linear/attnlab", "linear/attnlab-triton", "linear/fla"),
          "softmax/sdpa", shape={"batch": 4, "heads": 16, "kv_heads": 16}),
    Group("modules-causal", "Causal modules, attnlab.build(name, dim=512, heads=8), batch 1, "
          "against the softmax module (dma with w = L/8)",
          tuple(f"{n}/attnlab" for n in CAUSAL_MODULES), "softmax/attnlab", inputs="module"),
    Group("modules-bidir", "Bidirectional modules, attnlab.build(name, dim=512, heads=8), "
          "batch 1, against the softmax module",
          tuple(f"{n}/attnlab" for n in BIDIRECTIONAL_MODULES), "softmax/attnlab",
          inputs="module", shape={"causal": False}),
)}


@dataclass(frozen=True)
class Plan:
    group: str
    lengths: tuple[int, ...]
    modes: tuple[str, ...]
    kernels: tuple[int, ...] = ()  # window sizes K, a workload each (none: the group's K)


SUITES: dict[str, tuple[Plan, ...]] = {
    "ops": (Plan("scored", (4096,), ("train",)), Plan("scored", (16384,), ("inference",)),
            Plan("neighborhood", (16384,), ("train", "inference")),
            Plan("linear", (4096,), ("train",))),
    "modules": (Plan("modules-causal", (4096,), ("train", "inference")),
                Plan("modules-bidir", (4096,), ("train",))),
    "decode": (Plan("decode", (4096, 16384, 65536, 131072), ("inference",)),),
    # the GPU check of the Triton kernels (benchmarks/gpu_suite.sh): compute-bound shapes
    "gpu": (Plan("scored-large", (4096, 16384), ("train",)),
            Plan("scored-large", (16384,), ("inference",)),
            Plan("scored-large-d128", (8192,), ("train",)),
            Plan("neighborhood-large", (32768,), ("train", "inference"), kernels=(128, 2048)),
            Plan("linear-large", (4096, 16384), ("train",)),
            Plan("decode", (32768, 131072), ("inference",))),
    "scaling": (Plan("scored", (1024, 2048, 4096, 8192, 16384), ("train",)),
                Plan("neighborhood", (4096, 8192, 16384, 32768), ("inference",)),
                Plan("neighborhood-k", (16384,), ("inference",), kernels=(32, 64, 128, 256, 512)),
                Plan("linear", (1024, 2048, 4096, 8192, 16384), ("train",)),
                Plan("modules-causal", (2048, 4096, 8192, 16384), ("train",)),
                Plan("modules-bidir", (2048, 4096, 8192, 16384), ("train",))),
}


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: ``ratio`` (the contestant's speed over the baseline's at
    ``length``), ``ratio_of_ideal`` (that ratio over L / K), or ``exponent`` (the fitted
    growth of time along the group's axis, L or K, at most ``value``)."""

    label: str
    group: str
    mode: str
    contestant: str
    kind: str  # "ratio" (>= value), "ratio_of_ideal" (>= value), "exponent" (<= value)
    value: float
    length: int | None = None
    dtype: str = "fp32"
    kernel: int | None = None  # the neighborhood window K the target is about (None: any)


TARGETS = (
    # issue 36's GPU targets (bf16, compute-bound shapes: the "gpu" suite)
    Target("sigmoid training >= 1.05x SDPA (GPU, L=16384)", "scored-large", "train",
           "sigmoid/attnlab-triton", "ratio", 1.05, 16384, "bf16"),
    Target("sigmoid inference >= 1.2x SDPA (GPU, L=16384)", "scored-large", "inference",
           "sigmoid/attnlab-triton", "ratio", 1.2, 16384, "bf16"),
    Target("LSSA training >= 0.8x SDPA (GPU, L=16384)", "scored-large", "train",
           "lssa/attnlab-triton", "ratio", 0.8, 16384, "bf16"),
    Target("LSSAR training >= 0.6x SDPA (GPU, L=16384)", "scored-large", "train",
           "lssar/attnlab-triton", "ratio", 0.6, 16384, "bf16"),
    Target("neighborhood K=128 >= 50% of ideal (GPU, L=32768)", "neighborhood-large",
           "inference", "neighborhood/attnlab-triton", "ratio_of_ideal", 0.5, 32768, "bf16",
           kernel=128),
    Target("neighborhood K=2048 >= 50% of ideal (GPU, L=32768)", "neighborhood-large",
           "inference", "neighborhood/attnlab-triton", "ratio_of_ideal", 0.5, 32768, "bf16",
           kernel=2048),
    Target("decode >= 2x a plain matmul (GPU, cache 32k-128k)", "decode", "inference",
           "decode/attnlab-triton", "ratio", 2.0, None, "bf16"),
    Target("sigmoid training >= 0.9x SDPA at L=4096", "scored", "train", "sigmoid/attnlab",
           "ratio", 0.9, 4096),
    Target("LSSA training >= 0.8x SDPA at L=4096", "scored", "train", "lssa/attnlab",
           "ratio", 0.8, 4096),
    Target("LSSAR training >= 0.8x SDPA at L=4096", "scored", "train", "lssar/attnlab",
           "ratio", 0.8, 4096),
    Target("neighborhood inference >= 50% of ideal L/K at L=16384", "neighborhood",
           "inference", "neighborhood/attnlab", "ratio_of_ideal", 0.5, 16384),
    Target("neighborhood time grows <= 1.1x per unit of L (K = 128)", "neighborhood",
           "inference", "neighborhood/attnlab", "exponent", 1.1),
    Target("neighborhood time grows <= 1.1x per unit of K (L = 16384)", "neighborhood-k",
           "inference", "neighborhood/attnlab", "exponent", 1.1),
    Target("mala exponent <= 1.1", "modules-bidir", "train", "mala/attnlab", "exponent", 1.1),
    Target("inline exponent <= 1.1", "modules-bidir", "train", "inline/attnlab", "exponent",
           1.1),
    Target("decode >= a plain batched matmul (every cache length)", "decode", "inference",
           "decode/attnlab", "ratio", 1.0),
    Target("dma (w = L/8) faster than softmax at L=8192", "modules-causal", "train",
           "dma/attnlab", "ratio", 1.0, 8192),
    Target("dma (w = L/8) faster than softmax at L=16384", "modules-causal", "train",
           "dma/attnlab", "ratio", 1.0, 16384),
)


def workloads(suite: str, device: str, dtypes: tuple[str, ...], rounds: int, *,
              lengths: tuple[int, ...] | None = None, modes: tuple[str, ...] | None = None,
              groups: tuple[str, ...] | None = None) -> list[Workload]:
    """The workloads of ``suite``, optionally narrowed (lengths replace the suite's own)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
    out = []
    for plan in SUITES[suite]:
        if groups and plan.group not in groups:
            continue
        group = GROUPS[plan.group]
        for mode in plan.modes:
            if modes and mode not in modes:
                continue
            for dtype, length, kernel in product(dtypes, lengths or plan.lengths,
                                                 plan.kernels or (None,)):
                shape = group.shape if kernel is None else {**group.shape, "kernel": kernel}
                out.append(Workload(group=plan.group, length=length, mode=mode, dtype=dtype,
                                    device=device, rounds=rounds, **shape))
    return list(dict.fromkeys(out))
