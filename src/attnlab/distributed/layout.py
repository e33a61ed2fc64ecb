"""Where each rank's piece of a sequence lies, and the ring that passes key blocks on.

A sequence split over the ranks of a process group: rank r holds the contiguous positions
``offsets[r] .. offsets[r] + lengths[r]`` (pieces may differ in length). ``ring_pass`` sends
tensors to the next rank and receives the previous rank's, with a timeout so that a dead
peer raises instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT = timedelta(minutes=5)


def require_group(op: str, group: dist.ProcessGroup | None) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group (e.g. under torchrun) first")
    if group is not None and dist.get_rank(group) < 0:
        raise RuntimeError(f"{op}: this process is not a member of the given group")


@dataclass(frozen=True)
class Layout:
    """The split of a sequence over a group: ``rank``, ``world``, every rank's ``lengths``
    and ``offsets`` (global start positions) and ``valid`` (B, world): each rank's count of
    real (not padded) keys per sequence."""

    rank: int
    world: int
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    valid: Tensor

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def positions(self, rank: int, device: torch.device) -> Tensor:
        """Global positions of ``rank``'s piece, padded to the longest piece."""
        return torch.arange(self.longest, device=device) + self.offsets[rank]


def layout(local_length: int, key_valid: Tensor, group: dist.ProcessGroup | None = None
           ) -> Layout:
    """Gather every rank's piece length and real-key counts (one all_gather)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.cat([torch.tensor([local_length], device=key_valid.device),
                      key_valid.sum(-1)]).to(torch.int64)
    pieces = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(pieces, mine, group=group)
    table = torch.stack(pieces).cpu()  # (world, 1 + B)
    lengths = tuple(int(n) for n in table[:, 0])
    offsets = tuple(int(sum(lengths[:r])) for r in range(world))
    return Layout(rank, world, lengths, offsets, table[:, 1:].T.contiguous())


def pad_to(t: Tensor, length: int, dim: int, value: float = 0.0) -> Tensor:
    """``t`` padded with ``value`` along ``dim`` to ``length``."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def ring_pass(tensors: list[Tensor], group: dist.ProcessGroup | None = None,
              timeout: timedelta = DEFAULT_TIMEOUT) -> list[Tensor]:
    """Send ``tensors`` to rank + 1 and return those of rank - 1 (same shapes and dtype on
    every rank), packed into one message each way."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).contiguous()
    incoming = torch.empty_like(flat)
    to_rank = dist.get_global_rank(group, (rank + 1) % world) if group else (rank + 1) % world
    from_rank = dist.get_global_rank(group, (rank - 1) % world) if group else \
        (rank - 1) % world
    works = [dist.isend(flat, to_rank, group=group), dist.irecv(incoming, from_rank,
                                                                   group=group)]
    for work in works:
        assert work is not None  # this rank is in the group
        if not work.wait(timeout):
            raise RuntimeError(f"ring pass between ranks timed out after {timeout}")
    out, start = [], 0
    for t in tensors:
        out.append(incoming[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


class AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over the group, differentiable: the gradient of each rank's input is
    the sum of the ranks' gradients of the result."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
