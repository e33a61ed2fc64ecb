"""Worker functions that tests start in several processes (torch.multiprocessing.spawn):
each builds the same whole-sequence problem, runs its piece through the distributed op
and checks it against the single-process op."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from attnlab import ops
from attnlab.distributed import sequence_parallel_attention


def start(rank: int, world: int, init_file: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))


def whole_op(kind: str, q, k, v, causal: bool, keep):
    mask = None if keep is None else keep[:, None, None, :]
    if kind == "softmax":
        return ops.softmax_attention(q, k, v, causal=causal, mask=mask, backend="reference")
    if kind == "sigmoid":
        return ops.sigmoid_attention(q, k, v, causal=causal, mask=mask, backend="reference")
    if kind == "softplus":
        return ops.softplus_attention(q, k, v, causal=causal, mask=mask, backend="reference")
    return ops.linear_attention(q, k, v, causal=causal, mask=mask, backend="parallel")


def split(total: int, world: int) -> list[int]:
    """Uneven piece lengths: the first ranks get one more."""
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


def agreement(rank: int, world: int, init_file: str, cases: list, result_dir: str) -> None:
    """For each (kind, causal, padded, kv_heads) case: the piece's output and the gradients
    of q, k, v of the piece equal the whole op's, to 1e-5."""
    start(rank, world, init_file)
    try:
        errors = []
        for index, (kind, causal, padded, kv_heads, total) in enumerate(cases):
            g = torch.Generator().manual_seed(index)  # the same problem on every rank
            b, h, d = 2, 4, 8
            q = torch.randn(b, h, total, d, generator=g, dtype=torch.float64)
            k = torch.randn(b, kv_heads, total, d, generator=g, dtype=torch.float64)
            v = torch.randn(b, kv_heads, total, d, generator=g, dtype=torch.float64)
            gout = torch.randn(b, h, total, d, generator=g, dtype=torch.float64)
            keep = None
            if padded:
                keep = torch.rand(b, total, generator=g) > 0.3
                keep[:, 0] = True
            q, k, v = (t.float().requires_grad_() for t in (q, k, v))
            gout = gout.float()
            whole = whole_op(kind, q, k, v, causal, keep)
            (whole * gout).sum().backward()
            lengths = split(total, world)
            lo = sum(lengths[:rank])
            hi = lo + lengths[rank]
            pq, pk, pv = (t.detach()[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v))
            out = sequence_parallel_attention(pq, pk, pv, kind=kind, causal=causal,
                                              key_mask=None if keep is None else
                                              keep[:, lo:hi])
            (out * gout[:, :, lo:hi]).sum().backward()
            pairs = [("out", out, whole[:, :, lo:hi]), ("dq", pq.grad, q.grad[:, :, lo:hi]),
                     ("dk", pk.grad, k.grad[:, :, lo:hi]), ("dv", pv.grad, v.grad[:, :, lo:hi])]
            for name, got, want in pairs:
                err = (got - want).abs().max().item() if got.numel() else 0.0
                if not err <= 1e-5 or not torch.isfinite(got).all():
                    errors.append(f"{kind} causal={causal} padded={padded} kv={kv_heads} "
                                  f"{name}: max error {err:.3g}")
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(errors) if errors else "ok")
    finally:
        dist.destroy_process_group()


def dead_peer(rank: int, world: int, init_file: str, result_dir: str, how: str) -> None:
    """Rank 1 dies (``how="exit"``) or stalls (``"stall"``) after joining; rank 0's call must
    raise within the group's timeout."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=5))
    # Both ranks must have finished joining before rank 1 leaves: a peer that exits while
    # the other is still connecting fails init_process_group itself, not the op under test.
    dist.barrier()
    if rank == 1:
        import time

        time.sleep(0.5)  # let rank 0 read the barrier's last message before the socket closes
        if how == "stall":
            time.sleep(8)
        os._exit(0)
    q = torch.randn(1, 2, 4, 8)
    try:
        sequence_parallel_attention(q, q, q, kind="softmax", timeout=timedelta(seconds=5))
        outcome = "returned"
    except Exception as err:  # noqa: BLE001 - the test reads what was raised
        outcome = f"raised {type(err).__name__}: {err}"
    with open(os.path.join(result_dir, "rank0.txt"), "w") as f:
        f.write(outcome)
    os._exit(0)  # the group is broken: do not wait for it on the way out
