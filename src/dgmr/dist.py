"""The same code alone or under ``torchrun``: process-group setup and the few collectives dgmr uses.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process
group (NCCL on GPU, gloo on CPU; torchrun's rendezvous, so multi-node works the same);
alone it does nothing and every helper degrades to the single-process answer.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import DgmrError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this call created the process group (and :func:`cleanup` ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group if launched by torchrun; pick this process's device.

    ``device``: "cpu", "cuda", or None for cuda when available."""
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if device is not None and not str(device).startswith(("cuda", "cpu")):
        raise DgmrError(f"unknown device {device!r}: use cpu or cuda")
    if want_cuda and not torch.cuda.is_available():
        raise DgmrError(f"device {device} asked for, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if want_cuda else None)
        started = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, started)


def cleanup(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (returns ``t`` itself, reduced in place, when distributed)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
