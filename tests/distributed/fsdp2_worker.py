"""One rank of tests/distributed/test_fsdp2.py: FSDP2 (``fully_shard``) on two CPU processes
(gloo) of an attnlab mechanism built on the meta device, its weights loaded from rank 0's
full state dict, one SGD step on half the batch; the full parameters and the output go to
``<out>/rank<r>.pt``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import attnlab as al

DIM, HEADS = 32, 4


def build(name: str) -> torch.nn.Module:
    return al.build(name, dim=DIM, heads=HEADS, causal=True, rope=True)


def batch() -> torch.Tensor:
    return torch.randn(4, 12, DIM, generator=torch.Generator().manual_seed(1))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def main(rank: int, world: int, name: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):  # no memory, nothing drawn
        attn = build(name)
    fully_shard(attn, mesh=mesh)
    attn.to_empty(device="cpu")
    # the weights: rank 0's full state dict (a checkpoint, or a seeded build), broadcast
    torch.manual_seed(0)
    state = build(name).state_dict() if rank == 0 else {}
    set_model_state_dict(attn, state, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    # the optimizer takes the sharded parameters, so it is made before any forward: the root
    # module keeps its parameters unsharded after a forward until the backward (FSDP2's
    # reshard_after_forward is False for the root), and an optimizer made then would hold the
    # unsharded tensors, which no gradient reaches (the step silently changes nothing)
    optimizer = torch.optim.SGD(attn.parameters(), lr=0.1)
    x = batch()
    before = attn(x).detach()
    # one SGD step on this rank's half of the batch; FSDP2 averages the gradients
    attn(x[rank::world]).pow(2).mean().backward()
    optimizer.step()
    params = {k: full(v).detach().clone() for k, v in attn.named_parameters()}
    torch.save({"before": before, "params": params}, os.path.join(out, f"rank{rank}.pt"))
    # both ranks done before either tears gloo down: a rank that destroyed the group while
    # the other still had gloo work pending aborted once in CI ("terminate called without an
    # active exception", exit 1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    name, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.multiprocessing.spawn(main, args=(2, name, port, out), nprocs=2)
