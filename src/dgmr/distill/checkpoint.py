"""The run directory's files: the checkpoint, metrics.jsonl, and the exported student.

Every writer here is called on rank 0 only (the recipe decides who writes); the checkpoint
holds tensors and plain values only, so :func:`load_checkpoint` never unpickles objects.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DgmrError, first_line
from .. import schema
from ..paths import atomic_path, storage_error
from ..schema import metrics_row
from ..models.artifact import CONFIG, INDICES, save
from ..models.families import family_of
from ..models.sources import Source

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT_FORMAT = "dgmr-distill-checkpoint"


def checkpoint_dict(*, step: int, epoch: int, images_seen: int, unreadable: list[str], student: dict, optimizer: dict,
                    ema: dict | None, rng: list, cuda_rng: list | None, world_size: int,
                    unreadable_reads: int = 0) -> dict[str, Any]:
    """The checkpoint as saved (its keys and their order are the file format; ``unreadable_reads``
    is newer: older checkpoints lack it)."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "epoch": epoch, "images_seen": images_seen,
            "unreadable": unreadable, "student": student, "optimizer": optimizer, "ema": ema, "rng": rng,
            "cuda_rng": cuda_rng, "world_size": world_size, "unreadable_reads": unreadable_reads}


def atomic_torch_save(obj: Any, path: Path) -> None:
    """A kill or a full disk mid-write leaves the previous file intact and no temporary file
    (but a SIGKILL leaves ``.checkpoint.pt.tmp-<pid>``: :func:`~dgmr.paths.remove_stale_temps`)."""
    with atomic_path(path, "the checkpoint") as tmp:
        torch.save(obj, tmp)


def load_checkpoint(run_dir: str | os.PathLike, total_steps: int | None = None) -> dict[str, Any]:
    """A run's latest checkpoint (tensors and plain values only: nothing is unpickled),
    checked by :func:`dgmr.schema.checkpoint` (``step`` at most ``total_steps``)."""
    path = Path(run_dir) / CHECKPOINT
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


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """One metrics line; a line a full disk cuts short is dropped by the next ``--resume``
    (:func:`read_metrics`), which also cuts the file back to the checkpoint."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise storage_error(path, e, "the metrics") from None


def truncate_metrics(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Drop metrics lines a killed run wrote after its last checkpoint; returns the rows kept."""
    if not path.is_file():
        return []
    rows = read_metrics(path)
    keep = [(line, row) for line, row in rows if row["step"] <= last_step]
    if len(keep) != len(rows) or path.read_bytes().count(b"\n") != len(rows):
        with atomic_path(path, "the metrics") as tmp:
            tmp.write_text("".join(line + "\n" for line, _ in keep))
    return [row for _, row in keep]


def read_metrics(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each metrics.jsonl line (every reader's: ``--resume``, ``dgmr report``,
    the demo); blank lines are skipped, a last line cut short by a kill (or still being
    written) is dropped, any other bad line is an error naming the file and line."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise DgmrError(f"cannot read {path}: {e.strerror or e}") from None
    lines = lines[:-1] if lines and not lines[-1] else lines
    out = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = metrics_row(raw, f"{path}:{i + 1}")
            out.append((raw.decode("utf-8"), row))
        except DgmrError:
            if i == len(lines) - 1 and not raw.endswith(b"}"):
                continue  # the line a kill cut short
            raise
    return out


def first_logged_loss(rows: list[dict[str, Any]]) -> float | None:
    """The loss of a run's first metrics row (a resumed run reports it as its ``first_loss``)."""
    return rows[0].get("loss") if rows else None


def last_logged_loss(rows: list[dict[str, Any]]) -> float | None:
    """The loss of the last row kept (the checkpoint's step is always logged): the final loss
    of a run resumed after its last step, which trains no further step."""
    return rows[-1].get("loss") if rows else None


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
    try:
        config = save(student, tmp, source=src, record=None, extra=extra)
        if student_dir is not None and (student_dir / INDICES).is_file():
            shutil.copy2(student_dir / INDICES, tmp / INDICES)
    except BaseException as e:  # a full disk (save raised one DgmrError), a signal: no half export left
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise storage_error(out, e, "the exported student in") from None
        raise
    names = sorted(p.name for p in tmp.iterdir() if p.name != CONFIG) + [CONFIG]
    for name in names:
        dst = out / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
    tmp.rmdir()
    return config
