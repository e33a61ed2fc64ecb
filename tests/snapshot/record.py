"""Behaviour snapshot of every mechanism: outputs and gradients for fixed weights and inputs.

``python -m tests.snapshot.record`` rewrites ``tests/snapshot/mechanisms.pt`` (do that only
when a change of behaviour is intended); ``test_snapshot.py`` recomputes every case and
compares it with the file, so that a refactoring that changes any output or gradient of any
mechanism, variant or mode fails.

Everything runs in float64 (weights, inputs, outputs, gradients): the order in which a CPU's
vectorised kernels sum (AVX-512, AVX2, the scalar ``default`` path, other thread counts or
BLAS builds) then moves a result by ~1e-15 of its scale instead of float32's ~1e-7, so the
comparison can be tight enough to catch any change of behaviour and still hold on every CPU.
The weights are created as the module creates them (float32, seeded) and then widened.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import attnlab as al

PATH = Path(__file__).with_name("mechanisms.pt")
DIM, HEADS, LENGTH = 16, 4, 11
WIDER = {"shvit": 32}  # its partial-channel head needs more width for RoPE
COMMON = {"kv_heads": 2, "qk_norm": True, "rope": True, "gate": "headwise"}


def cases() -> list[tuple[str, str, dict, bool]]:
    """(case id, mechanism, kwargs, causal) for every mechanism, variant and mode."""
    out = []
    for name in al.available():
        info = al.info(name)
        common = {k: v for k, v in COMMON.items() if k not in info.unsupported}
        for i, kwargs in enumerate([{}, *info.variants, common]):
            for causal, ok in ((True, info.causal), (False, info.bidirectional)):
                if ok:
                    out.append((f"{name}-v{i}-{'causal' if causal else 'bidir'}", name,
                                kwargs, causal))
    return out


def case_mechanism(case_id: str) -> str:
    """The mechanism of a case id ``<name>-v<i>-<mode>``."""
    return case_id.rsplit("-", 2)[0]


def width(name: str) -> int:
    return WIDER.get(name, DIM)


def build(name: str, kwargs: dict, causal: bool) -> al.Attention:
    torch.manual_seed(0)
    attn = al.build(name, dim=width(name), heads=HEADS, causal=causal, **kwargs)
    with torch.no_grad():  # non-trivial norms, gates and biases
        for p in attn.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return attn.double().eval()


def _inputs(width: int, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, length, width, generator=g, dtype=torch.float64)


def _padding(length: int = LENGTH) -> torch.Tensor:
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, -4:] = False
    keep[1, 5] = False
    return keep


def _uses_rope(attn: al.Attention) -> bool:
    if hasattr(attn, "uses_rope"):
        return attn.uses_rope
    return attn.rotary is not None  # before the parts refactoring


def compute(attn: al.Attention, name: str, causal: bool) -> dict[str, torch.Tensor]:
    """Every observable of one module on fixed inputs (parameter gradients by name)."""
    info = al.info(name)
    x, keep = _inputs(attn.dim), _padding()
    result: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        result["out"] = attn(x)
        result["out_masked"] = attn(x, mask=keep)
        if info.weights:
            result["weights"] = attn.weights(x)
            result["weights_masked"] = attn.weights(x, mask=keep)
        if "image" in info.domains:
            result["out_image"] = attn(_inputs(attn.dim, 15, seed=2).reshape(2, 3, 5, attn.dim))
        if info.cross and not causal and not _uses_rope(attn):
            ctx = _inputs(attn.dim, 7, seed=3)
            result["out_cross"] = attn(x, context=ctx)
        if info.decode and causal:
            state = attn.new_state(batch_size=2)
            steps = [attn(x[:, :4], mask=keep[:, :4], state=state)]
            steps += [attn(x[:, t:t + 1], mask=keep[:, t:t + 1], state=state)
                      for t in range(4, LENGTH)]
            result["decode"] = torch.cat(steps, 1)
    attn.train()
    torch.manual_seed(7)  # training-mode randomness (MIL's instance masking), whatever the
    # construction consumed
    xg = x.clone().requires_grad_()
    y = attn(xg, mask=keep)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + attn.extra_loss()
    loss.backward()
    attn.eval()
    if not torch.equal(y.detach(), result["out_masked"]):  # train mode differs (a norm)
        result["out_train"] = y.detach()
    result["loss"] = loss.detach()
    result["grad_x"] = xg.grad
    for pname, p in attn.named_parameters():
        if p.grad is not None:
            result[f"grad.{pname}"] = p.grad.clone()
            p.grad = None
    return result


PROJECTIONS = 16
PROJECTED = ("weights", "grad.")  # stored as random projections, the rest element by element


def projected(key: str) -> bool:
    return key.startswith(PROJECTED)


def project(t: torch.Tensor) -> torch.Tensor:
    """``PROJECTIONS`` fixed N(0, 1) projections of ``t`` (float64): each moves by about one
    element's error, so they catch any changed element without storing all of them."""
    g = torch.Generator().manual_seed(t.numel())
    r = torch.randn(PROJECTIONS, t.numel(), generator=g, dtype=torch.float64)
    return r @ t.detach().double().flatten()


def stored(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: project(t) if projected(k) else t for k, t in result.items()}


def record(only: set[str] | None = None) -> dict[str, dict]:
    """case id -> {"state_dict": ..., "result": ...} (result as stored: some projected);
    ``only``: the cases of these mechanisms."""
    snapshot = {}
    for case_id, name, kwargs, causal in cases():
        if only is not None and name not in only:
            continue
        attn = build(name, kwargs, causal)
        state = {k: v.clone() for k, v in attn.state_dict().items()}
        result = compute(attn, name, causal)
        sizes = {k: torch.tensor(t.numel()) for k, t in result.items() if projected(k)}
        snapshot[case_id] = {"state_dict": state, "result": stored(result), "sizes": sizes}
    return snapshot


def pack(snapshot: dict[str, dict]) -> dict:
    """One flat tensor per dtype and an index: thousands of small tensors saved one by one
    cost more in per-tensor overhead than in numbers."""
    index, chunks, offsets = [], {}, {}
    for case_id, parts in snapshot.items():
        for part, tensors in parts.items():
            for key, t in tensors.items():
                dtype = str(t.dtype).removeprefix("torch.")
                start = offsets.get(dtype, 0)
                chunks.setdefault(dtype, []).append(t.detach().flatten())
                offsets[dtype] = start + t.numel()
                index.append((case_id, part, key, dtype, start, tuple(t.shape)))
    return {"index": index, "data": {d: torch.cat(c) for d, c in chunks.items()}}


def unpack(packed: dict) -> dict[str, dict]:
    snapshot: dict[str, dict] = {}
    for case_id, part, key, dtype, start, shape in packed["index"]:
        n = int(torch.Size(shape).numel())
        t = packed["data"][dtype][start:start + n].reshape(shape)
        snapshot.setdefault(case_id, {}).setdefault(part, {})[key] = t
    return snapshot


def load() -> dict[str, dict]:
    return unpack(torch.load(PATH))


if __name__ == "__main__":
    # ``python -m tests.snapshot.record``: every case; ``... record moh cca``: re-record only
    # the cases of these mechanisms and keep every other recorded case as it is
    names = set(sys.argv[1:])
    unknown = names - set(al.available())
    if unknown:
        raise SystemExit(f"unknown mechanisms: {sorted(unknown)}")
    if names:
        snap = {k: v for k, v in load().items() if case_mechanism(k) not in names}
        snap.update(record(names))
    else:
        snap = record()
    torch.save(pack(snap), PATH)
    print(f"{len(snap)} cases -> {PATH} ({PATH.stat().st_size / 1e6:.1f} MB)"
          + (f"; re-recorded: {sorted(names)}" if names else ""))
