"""torchrun support: who this process is, and the few collectives the trainer needs (torch.distributed only).

``torchrun --nproc_per_node=N -m frugaldiff train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo on CPU).
Without them everything here is a no-op on a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import FrugalError


def rank_share(x: Any, rank: int, size: int) -> Any:
    """Rank ``rank``'s contiguous share of ``x`` (drawn alike on every rank) along dim 0: rows
    [rank·n, (rank+1)·n) with n = len(x) / size, so the shares of all ranks, in rank order, are ``x``."""
    n = len(x) // size
    return x[rank * n:(rank + 1) * n]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, prints and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, x: Tensor) -> Tensor:
        """This rank's share of ``x`` (see :func:`rank_share`)."""
        return rank_share(x, self.rank, self.size)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, x: Tensor) -> Tensor:
        """Concatenate every rank's ``x`` (same shape on every rank) along dim 0, in rank order."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def mean(self, values: Tensor) -> Tensor:
        """Element-wise mean of ``values`` over ranks."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on any rank (e.g. a signal that reached only some)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


#: The world of a plain (non-torchrun) process.
SINGLE_PROCESS = World()


def world_from_env() -> World:
    """The World torchrun describes in the environment (a world of one without it)."""
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise FrugalError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); start with torchrun") from e
    return World(rank, size, local_rank)


def init_distributed(device_name: str) -> tuple[World, str]:
    """Join torchrun's process group if there is one; returns the world and the device name for this rank
    (``cuda:<local_rank>`` for CUDA), with NCCL on CUDA and gloo otherwise."""
    world = world_from_env()
    if not world.distributed:
        return world, device_name
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise FrugalError(f"rank {world.rank} wants cuda:{world.local_rank} but this machine has "
                              f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        torch.cuda.set_device(world.local_rank)
        device_name = f"cuda:{world.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return world, device_name


def close_distributed() -> None:
    """Leave the process group (at the end of training)."""
    if dist.is_initialized():
        dist.destroy_process_group()
