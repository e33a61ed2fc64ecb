"""Sequence-parallel attention on CUDA: attnlab's ring and torch's ``context_parallel``
against the single-process op, forward and backward.

``WORLD=2 BACKEND=nccl python benchmarks/diagnostics/sequence_parallel_cuda.py`` starts
WORLD processes (rank r on GPU r mod the GPU count), each holding a contiguous piece of the
same sequence; every kind is checked against ``ops.<kind>_attention`` on the whole sequence
(fp32, TF32 off), and softmax also through ``torch.distributed.tensor.experimental.
context_parallel`` (SDPA's ring), compared after ``context_parallel_unshard``. Prints one line
per check and the largest error. Needs CUDA; the CPU path is tested in tests/distributed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from attnlab import ops
from attnlab.distributed import sequence_parallel_attention

WHOLE = {
    "softmax": lambda q, k, v, c: ops.softmax_attention(q, k, v, causal=c, backend="reference"),
    "sigmoid": lambda q, k, v, c: ops.sigmoid_attention(q, k, v, causal=c, backend="reference"),
    "softplus": lambda q, k, v, c: ops.softplus_attention(q, k, v, causal=c,
                                                          backend="reference"),
    "linear": lambda q, k, v, c: ops.linear_attention(q, k, v, causal=c, backend="parallel"),
}


def problem(seed: int, length: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, length, 32, generator=g).to(device) for _ in range(4)]


def attnlab_ring(rank: int, world: int, device: torch.device, length: int) -> list[str]:
    lines = []
    piece = length // world
    lo, hi = rank * piece, (rank + 1) * piece
    for index, (kind, causal) in enumerate((k, c) for k in WHOLE for c in (True, False)):
        q, k, v, gout = problem(index, length, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        (WHOLE[kind](q, k, v, causal) * gout).sum().backward()
        whole = WHOLE[kind](q, k, v, causal).detach()
        pq, pk, pv = (t.detach()[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v))
        out = sequence_parallel_attention(pq, pk, pv, kind=kind, causal=causal)
        (out * gout[:, :, lo:hi]).sum().backward()
        err = max((a - b).abs().max().item() for a, b in (
            (out, whole[:, :, lo:hi]), (pq.grad, q.grad[:, :, lo:hi]),
            (pk.grad, k.grad[:, :, lo:hi]), (pv.grad, v.grad[:, :, lo:hi])))
        lines.append(f"attnlab ring {kind:8s} causal={causal!s:5s} max error (out, dq, dk, dv) "
                     f"{err:.2e}")
    return lines


def torch_context_parallel(world: int, device: torch.device, length: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    try:
        from torch.distributed.tensor.experimental import context_parallel_unshard
    except ImportError:  # torch < 2.12 keeps it in the private module
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.distributed.tensor.experimental._attention import _cp_options as cp_options
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mesh = init_device_mesh(device.type, (world,))
    lines = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        for causal in (True, False):
            q, k, v, gout = problem(7, length, device)
            low = backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)
            q, k, v = (t.bfloat16() if low else t for t in (q, k, v))
            gout = gout.to(q.dtype)
            wq, wk, wv = (t.detach().clone().requires_grad_() for t in (q, k, v))
            whole = ops.softmax_attention(wq, wk, wv, causal=causal, backend="reference")
            (whole * gout).sum().backward()
            # torch's round-robin load balancing (for causal) refuses bidirectional attention
            cp_options.enable_load_balance = causal
            try:
                with sdpa_kernel(backend), context_parallel(
                        mesh, buffers=[q, k, v, gout], buffer_seq_dims=[2, 2, 2, 2],
                        no_restore_buffers={q, k, v, gout}):
                    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    (out * gout).sum().backward()
                full = context_parallel_unshard(mesh, [out, q.grad, k.grad, v.grad],
                                                [2, 2, 2, 2])
            except Exception as error:  # noqa: BLE001 - a diagnostic: report and go on
                lines.append(f"torch context_parallel {backend.name} causal={causal}: "
                             f"{type(error).__name__}: {str(error)[:160]}")
                continue
            err = max((a.float() - b.float()).abs().max().item()
                      for a, b in zip(full, (whole, wq.grad, wk.grad, wv.grad), strict=True))
            lines.append(f"torch context_parallel {backend.name} {q.dtype} causal={causal!s:5s}"
                         f" max error (out, dq, dk, dv) {err:.2e}")
    return lines


def worker(rank: int, world: int, backend: str, init_file: str, length: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        lines = attnlab_ring(rank, world, device, length)
        if rank == 0:
            print("\n".join(f"[{backend} x{world}] {line}" for line in lines), flush=True)
        lines = torch_context_parallel(world, device, length)
        if rank == 0:
            print("\n".join(f"[{backend} x{world}] {line}" for line in lines), flush=True)
    except Exception:  # noqa: BLE001 - a diagnostic: report and go on
        print(f"[{backend} x{world}] rank {rank} failed:\n{traceback.format_exc()}", flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    world = int(os.environ.get("WORLD", 2))
    backend = os.environ.get("BACKEND", "nccl")
    length = int(os.environ.get("LENGTH", 1024))
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, backend, os.path.join(tmp, "init"), length),
                 nprocs=world)


if __name__ == "__main__":
    main()
