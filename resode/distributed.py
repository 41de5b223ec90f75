"""Data-parallel helpers: the same training code runs single-process or under ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`setup` initialises the
default process group (NCCL on CUDA, gloo on CPU) unless the caller already did; rank 0 logs and
writes checkpoints; metrics are summed over ranks with :func:`all_reduce_sum`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when :func:`setup` created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str = "cpu") -> DistInfo:
    """Join the process group described by the environment (torchrun), or run single-process.

    An already-initialised default group (e.g. created by a test harness) is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, owns_group=True)


def teardown(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op single-process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum of ``t`` over ranks in place (no-op single-process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if info.enabled:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)
