"""The run directory's files: the checkpoint, metrics.jsonl, and the exported student.

Every writer here is called on rank 0 only (the recipe decides who writes); the checkpoint
holds tensors and plain values only, so :func:`load_checkpoint` never unpickles objects.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DgmrError, first_line
from ..models.artifact import CONFIG, INDICES, save
from ..models.families import family_of
from ..models.sources import Source

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT_FORMAT = "dgmr-distill-checkpoint"


def checkpoint_dict(*, step: int, epoch: int, images_seen: int, unreadable: list[str], student: dict, optimizer: dict,
                    ema: dict | None, rng: list, cuda_rng: list | None, world_size: int) -> dict[str, Any]:
    """The checkpoint as saved (its keys and their order are the file format)."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "images_seen": images_seen,
            "unreadable": unreadable, "student": student, "optimizer": optimizer, "ema": ema, "rng": rng,
            "cuda_rng": cuda_rng, "world_size": world_size}


def atomic_torch_save(obj: Any, path: Path) -> None:
    """A kill mid-write leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run's latest checkpoint (tensors and plain values only: nothing is unpickled)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise DgmrError(f"nothing to resume: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file, or one holding objects we refuse to unpickle
        raise DgmrError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DgmrError(f"{path} is not a dgmr distill checkpoint")
    return ckpt


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines a killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short by the kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def first_logged_loss(path: Path) -> float | None:
    """The loss of a run's first metrics line (a resumed run reports it as its ``first_loss``)."""
    if not path.is_file():
        return None
    first_rows = path.read_text().splitlines()[:1]
    return json.loads(first_rows[0])["loss"] if first_rows else None


def export_student(student: nn.Module, out: Path, src: Source | None, student_cfg: dict | None, dtype: torch.dtype,
                   distill_info: dict[str, Any], student_dir: Path | None) -> dict[str, Any]:
    """Write the student into ``out`` as ``dgmr prune`` does (config.json written last, so a
    directory with a config.json is a complete model)."""
    student = student.to(dtype)
    family = family_of(student)
    extra: dict[str, Any] = {"distill": distill_info, "params_after": family.vision_params(student)}
    if student_cfg is not None:
        for key in ("prune", "params_before", "random_init"):
            if key in student_cfg:
                extra[key] = student_cfg[key]
    tmp = out / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    config = save(student, tmp, source=src, record=None, extra=extra)
    if student_dir is not None and (student_dir / INDICES).is_file():
        shutil.copy2(student_dir / INDICES, tmp / INDICES)
    names = sorted(p.name for p in tmp.iterdir() if p.name != CONFIG) + [CONFIG]
    for name in names:
        dst = out / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
    tmp.rmdir()
    return config
