"""One measured configuration (a *workload*) and the inputs every contestant of it shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("train", "inference")
TRAIN_FLOP_FACTOR = 3.5  # forward + backward ~ 3.5x the forward's matmul work (the FA2 convention)


@dataclass(frozen=True)
class Workload:
    """Everything that changes a number: a result is identified by its workload and its
    contestant, nothing else is pooled."""

    group: str
    length: int  # sequence length (the cache length in the decode group)
    mode: str  # "train" (forward + backward) or "inference" (forward, no grad)
    dtype: str  # "fp32" or "bf16"
    device: str
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    causal: bool = True
    kernel: int = 0  # neighborhood window K (0: none)
    dim: int = 512  # modules: model width
    rounds: int = 5
    extra: tuple[tuple[str, object], ...] = field(default=())  # group-specific settings

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.length < 1 or self.rounds < 1:
            raise ValueError("length and rounds must be >= 1")

    @property
    def train(self) -> bool:
        return self.mode == "train"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        """Group, L (and K for a neighborhood), mode and dtype: how progress and the
        reports name the workload."""
        window = f" K={self.kernel}" if self.kernel else ""
        return f"{self.group} L={self.length}{window} {self.mode} {self.dtype}"

    def key(self) -> dict:
        """The workload as a JSON-able dict (a result row carries it whole)."""
        out = asdict(self)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_key(cls, key: dict) -> Workload:
        key = dict(key)
        key["extra"] = tuple(sorted(key.get("extra", {}).items()))
        return cls(**key)


def op_inputs(w: Workload) -> dict[str, torch.Tensor]:
    """q (B, H, L, D), k and v (B, H_kv, L_kv, D) and, for training, the output gradient;
    the same seed for every contestant of a workload."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lq = 1 if w.group == "decode" else w.length
    lk = w.length

    def make(heads: int, n: int) -> torch.Tensor:
        t = torch.randn(w.batch, heads, n, w.head_dim, generator=g)
        return t.to(device=w.device, dtype=w.torch_dtype).requires_grad_(w.train)

    inputs = {"q": make(w.heads, lq), "k": make(w.kv_heads, lk), "v": make(w.kv_heads, lk)}
    if w.train:
        inputs["grad"] = torch.randn(w.batch, w.heads, lq, w.head_dim, generator=g).to(
            device=w.device, dtype=w.torch_dtype)
    return inputs


def module_inputs(w: Workload) -> dict[str, torch.Tensor]:
    """x (B, L, dim) and, for training, the output gradient."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(w.batch, w.length, w.dim, generator=g).to(w.device)
    inputs = {"x": x.requires_grad_(w.train)}
    if w.train:
        inputs["grad"] = torch.randn(w.batch, w.length, w.dim, generator=g).to(w.device)
    return inputs
