"""One arena run on several processes: join the group torchrun describes, split each
global batch over the ranks, and average what every rank must agree on."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_RUN_TIMEOUT = timedelta(minutes=30)


def launched_world() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu", timeout: timedelta = DEFAULT_RUN_TIMEOUT
                  ) -> tuple[int, int] | None:
    """Join the process group of a torchrun launch (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``): gloo for CPU runs, NCCL (one GPU per ``LOCAL_RANK``)
    for CUDA runs. Returns (rank, world), or None when not launched on several processes.
    Collectives that wait longer than ``timeout`` raise instead of hanging."""
    if launched_world() <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def data_parallel() -> tuple[int, int] | None:
    """(rank, world) when this process belongs to a group of several, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def shard(batch: Any, rank: int, world: int) -> Any:
    """This rank's equal share (along dim 0) of every tensor of a (nested) batch."""
    if isinstance(batch, Tensor):
        if batch.shape[0] % world:
            raise ValueError(f"a batch of {batch.shape[0]} does not split evenly over "
                             f"{world} processes: make batch_size a multiple of {world}")
        return batch.tensor_split(world)[rank]
    if isinstance(batch, tuple | list):
        return type(batch)(shard(b, rank, world) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    return batch


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a (detached) tensor over the group."""
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def broadcast_from_first(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def group_alive(timeout: timedelta = timedelta(seconds=60)) -> str | None:
    """None when every rank answers a barrier within ``timeout``, else what went wrong
    (gloo names the ranks that did not answer)."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout)
        else:
            dist.barrier()
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None
