"""Training state and the checkpoint file: :class:`TrainState` (what changes as training runs),
the checkpoint's format (:func:`checkpoint_dict`), and writing and reading it.

The checkpoint holds tensors and plain values only, so :func:`read_checkpoint` never
unpickles objects. Writes are atomic (:func:`atomic_torch_save`); on a GPU they run in a
:class:`BackgroundWriter` thread from a host copy (:func:`to_cpu`). Where the file lives in a
run directory is :mod:`.rundir`'s business.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DgmrError, first_line
from ..io import schema
from ..io.output import atomic_path

CHECKPOINT_FORMAT = "dgmr-distill-checkpoint"


@dataclass
class TrainState:
    """What changes as training runs; a checkpoint restores step, images_seen, unreadable, the EMA
    (and the RNGs), so a resumed run continues bit for bit."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # of the latest micro-batch
    images_seen: int = 0  # all ranks, counted at each log
    unreadable: set[str] = field(default_factory=set)  # this rank's unreadable images
    unreadable_reads: int = 0  # all ranks, counted at each log: failed reads (an image may fail in every epoch)
    ema: dict[str, torch.Tensor] | None = None  # name -> EMA of a trainable parameter (DTensors under FSDP)
    first_loss: float | None = None
    last_loss: float | None = None
    # since the last log, on the device so a step needs no host sync: loss, pooled, tokens sums and images
    sums: torch.Tensor | None = None
    last_log_t: float = 0.0

    def restore_counters(self, ckpt: dict[str, Any]) -> None:
        """The counters a checkpoint saved (the epoch follows from the step when training starts)."""
        self.step, self.images_seen = int(ckpt["step"]), int(ckpt["images_seen"])
        self.unreadable = set(ckpt["unreadable"])
        self.unreadable_reads = int(ckpt.get("unreadable_reads", 0))  # absent from older checkpoints


def checkpoint_dict(*, step: int, epoch: int, images_seen: int, unreadable: list[str], student: dict, optimizer: dict,
                    ema: dict | None, rng: list, cuda_rng: list | None, world_size: int,
                    unreadable_reads: int = 0, held_out: dict | None = None,
                    best_weights: dict | None = None) -> dict[str, Any]:
    """The checkpoint as saved (its keys and their order are the file format; ``unreadable_reads``,
    ``held_out`` (val_loss so far: :class:`~.validation.Tracker`) and ``best_weights`` (None: the
    best are the checkpoint's own, or there are none) are newer: older checkpoints lack them)."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "images_seen": images_seen,
            "unreadable": unreadable, "student": student, "optimizer": optimizer, "ema": ema, "rng": rng,
            "cuda_rng": cuda_rng, "world_size": world_size, "unreadable_reads": unreadable_reads,
            "held_out": held_out, "best_weights": best_weights}


def atomic_torch_save(obj: Any, path: Path) -> None:
    """A kill or a full disk mid-write leaves the previous file intact and no temporary file
    (but a SIGKILL leaves ``.checkpoint.pt.tmp-<pid>-...``: :func:`~dgmr.io.output.remove_stale_temps`)."""
    with atomic_path(path, "the checkpoint") as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: Path, total_steps: int | None = None) -> dict[str, Any]:
    """The checkpoint file at ``path`` (tensors and plain values only: nothing is unpickled),
    checked by :func:`dgmr.io.schema.checkpoint` (``step`` at most ``total_steps``)."""
    if not path.is_file():
        raise DgmrError(f"nothing to resume: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file, or one holding objects we refuse to unpickle
        raise DgmrError(f"cannot read checkpoint {path}: {weights_only_reason(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DgmrError(f"{path} is not a dgmr distill checkpoint")
    return schema.checkpoint(ckpt, str(path), total_steps)


def weights_only_reason(e: BaseException) -> str:
    """torch's refusal of a pickled object, without its advice to pass weights_only=False
    (which would run the file's code: never for a file we did not write)."""
    text = str(e)
    if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(Unsupported operand \S+)", text)
        if found:
            return f"it holds Python objects dgmr does not unpickle ({found.group(1)[:200]})"
        return "it holds Python objects dgmr does not unpickle"
    return first_line(e)


def to_cpu(obj: Any) -> Any:
    """A CPU copy of every tensor in a nested checkpoint dict (a snapshot training cannot change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints in a thread so the GPU does not wait on the disk; one write at a
    time (a new one first waits for the last), errors surface at the next :meth:`wait`."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def write(self, obj: Any, path: Path) -> None:
        self.wait()

        def run() -> None:
            try:
                atomic_torch_save(obj, path)
            except BaseException as e:  # reported by wait(), in the training thread
                self.error = e

        self.thread = threading.Thread(target=run, name="dgmr-checkpoint", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            if isinstance(e, DgmrError):
                raise e
            raise DgmrError(f"writing the checkpoint failed: {first_line(e)}") from e
