"""The same code alone or under ``torchrun``: process-group setup, devices, CPU count and
the few collectives dgmr uses. Distillation and evaluation both start their process group
here (:func:`init`/:func:`cleanup`, or :func:`session` around a block).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process
group (NCCL on GPU, gloo on CPU; torchrun's rendezvous, so multi-node works the same);
alone it does nothing and every helper degrades to the single-process answer.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

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


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1", None/"auto": cuda when available), checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DgmrError(f"unknown device {device!r}: use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise DgmrError(f"unknown device {device!r}: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DgmrError(f"device {device} asked for, but torch sees no CUDA device")
    return dev


def init(device: str | torch.device | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group if launched by torchrun; pick this process's device
    (under torchrun a GPU process takes its ``LOCAL_RANK`` GPU)."""
    dev = pick_device(device)
    want_cuda = dev.type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index if dev.index is not None
                                                                   else torch.cuda.current_device()))
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if want_cuda else None)
        started = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, started)


@contextlib.contextmanager
def session(device: str | torch.device | None = None) -> Iterator[DistInfo]:
    """:func:`init` for the duration of a block; the group is ended if this block started it."""
    info = init(device)
    try:
        yield info
    finally:
        cleanup(info)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors must live for a collective of the current group (NCCL: this GPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cleanup(info: DistInfo) -> None:
    global _HOST_GROUP
    if info.started_here and dist.is_initialized():
        # no reference may outlive the groups: a gloo group freed at interpreter exit aborts it
        _HOST_GROUP = None
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


_HOST_GROUP: tuple[Any, Any] | None = None  # (default group, a gloo group of the same ranks) for any_rank


def _host_group() -> Any:
    """A group whose collectives run on the host: the default one when it is gloo, else a gloo
    twin, made once per default group (every rank reaches its first any_rank together, as
    new_group needs)."""
    global _HOST_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None or _HOST_GROUP[0] is not dist.group.WORLD:
        _HOST_GROUP = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank. Agreed on the host (over gloo, a group of its own
    under NCCL), so it can be asked after every training step without making the host wait
    for the GPU: a CUDA tensor read back would sync with all the work queued so far."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(t.item())


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
