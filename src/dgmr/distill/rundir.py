"""The run directory: its files, claiming it, and what each file holds.

A run directory holds::

    run_config.json    resolved settings, the held-out images, the chosen peak lr (what --resume continues with)
    metrics.jsonl      one JSON line per logged step (step 0: the val_loss before training)
    checkpoint.pt      latest checkpoint (atomic; loaded with torch.load(weights_only=True))
    summary.json       what :func:`~dgmr.distill.distill` returned
    model.safetensors + dgmr.json + README.md (+ the library's own files)   the final student, as ``dgmr prune`` writes it

:class:`RunDir` checks and creates it (rank 0 decides, every rank raises the same error) and
holds its output lock; :func:`resume_settings` and :func:`resumed_inputs` are the rules a
``--resume`` follows. Every writer here is called on rank 0 only (the recipe decides who
writes); the checkpoint's format and I/O are :mod:`.state`'s.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import dist as D
from ..core.errors import DgmrError
from ..data.unlabeled import DataSource, data_paths
from ..io import schema
from ..io.output import (atomic_path, check_output_dir, discard, output_lock, refuse_overlap, remove_stale_temps,
                         storage_error, sync_dir)
from ..io.schema import metrics_row
from ..models.artifact import CONFIG, copy_kept_indices, legacy_leftovers, save
from ..models.families import family_of
from ..models.open import model_path
from ..models.sources import Source, is_dgmr_dir
from .settings import RESUME_MUTABLE, DistillSettings, read_config_file
from .state import TrainState, read_checkpoint

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def load_checkpoint(run_dir: str | os.PathLike, total_steps: int | None = None) -> dict[str, Any]:
    """A run's latest checkpoint (tensors and plain values only: nothing is unpickled),
    checked by :func:`dgmr.io.schema.checkpoint` (``step`` at most ``total_steps``)."""
    return read_checkpoint(Path(run_dir) / CHECKPOINT, total_steps)


# ---------------------------------------------------------------------------------------
# claiming the directory, and --resume


class RunDir:
    """The run directory ``out`` as one run claims it. Rank 0 takes its output lock at the first
    :meth:`check` and keeps it in :attr:`lock` (an exit stack the recipe holds open for the
    whole run)."""

    def __init__(self, out: Path, info: D.DistInfo, *, resume: bool, overwrite: bool):
        self.out, self.info, self.resume, self.overwrite = out, info, resume, overwrite
        self.lock = contextlib.ExitStack()

    def check(self, create: bool, teacher: Any, student: Any, data: Any, val_data: Any = None) -> None:
        """Rank 0 checks (and with ``create``, makes) the run directory; every rank raises the same error."""
        out, err = self.out, None
        if self.info.is_main:
            try:
                if not create:  # before the emptiness check: no second process between it and the rmtree
                    self.check_overlap(teacher, student, data, val_data)
                    self.lock.enter_context(output_lock(out))
                if self.resume:
                    if not (out / CHECKPOINT).is_file():
                        raise DgmrError(f"nothing to resume: {out / CHECKPOINT} does not exist")
                    if not create:  # under the lock: a killed run's partial checkpoint or export goes
                        remove_stale_temps(out)
                else:
                    check_output_dir(out, self.overwrite)
                    if create:
                        _clear(out)
                        out.mkdir(parents=True, exist_ok=True)
            except DgmrError as e:
                err = str(e)
            except OSError as e:
                err = f"cannot create the run directory {out}: {e.strerror or e}"
        err = D.broadcast_object(err, self.info)
        if err:
            raise DgmrError(err)

    def check_overlap(self, teacher: Any, student: Any, data: Any, val_data: Any = None) -> None:
        """The run directory must not be, contain or lie inside the teacher, student or data:
        ``--overwrite`` (and the export) would delete or change them."""
        inputs = [("teacher", model_path(teacher)), ("student", model_path(student)),
                  *[("data", d) for d in data_paths(data)], *[("val data", d) for d in data_paths(val_data)]]
        refuse_overlap(self.out, inputs, "run directory")

    def read_run_config(self) -> dict[str, Any]:
        """The run's run_config.json, checked by :func:`dgmr.io.schema.run_config`."""
        path = self.out / RUN_CONFIG
        return schema.run_config(schema.read_json_file(path, "the run's settings"), str(path))


def _clear(out: Path) -> None:
    """Empty ``out`` for a new run: a mount point (a container volume) cannot be removed, its content can."""
    if not out.is_dir():
        return
    if not os.path.ismount(out):
        shutil.rmtree(out)
        return
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def resume_settings(saved: dict[str, Any], config: str | os.PathLike | dict[str, Any] | None,
                    overrides: dict[str, Any]) -> DistillSettings:
    """The settings a resumed run continues with.

    ``saved`` is the run's ``run_config.json`` "settings"; ``config``/``overrides`` are what
    the resuming call gives. A resumed run keeps its saved settings so that it trains what the
    uninterrupted run would have: only :data:`RESUME_MUTABLE` settings (they do not change
    the trained weights) may be changed; naming any other with a different value is an error.
    No state is read or written besides the ``config`` file when one is given as a path.
    """
    s = DistillSettings.resolve(saved)
    new = DistillSettings.resolve(config, **overrides)
    if isinstance(config, (str, os.PathLike)):
        from_config = set(read_config_file(config))
    else:
        from_config = set(config or {})
    explicit = {k for k, v in overrides.items() if v is not None} | from_config
    for key in sorted(explicit - RESUME_MUTABLE):
        if getattr(new, key) != getattr(s, key):
            raise DgmrError(f"--resume continues with the run's saved settings; {key} was "
                            f"{getattr(s, key)!r}, now {getattr(new, key)!r}")
    for key in explicit & RESUME_MUTABLE:
        setattr(s, key, getattr(new, key))
    return s


def resumed_inputs(out: Path, saved: dict[str, Any], settings: DistillSettings, teacher: Any, student: Any,
                   data: Any) -> tuple[Any, Any, Any]:
    """(teacher, student, data) of a resumed run: those given, else the paths its run_config
    recorded. A --random-init model is rebuilt from the seed, which older runs did not record."""
    specs = [m for m in (saved.get("teacher"), saved.get("student")) if m and not is_dgmr_dir(m)]
    if settings.random_init and specs and not saved.get("random_init_seeded"):
        raise DgmrError(f"{out / RUN_CONFIG}: this run built its --random-init models without a seed (an older dgmr), "
                        "so a resume would train against a different random teacher: start the run again")
    teacher = teacher if teacher is not None else saved.get("teacher")
    student = student if student is not None else saved.get("student")
    data = data if data is not None else saved.get("data")
    if teacher is None or student is None or data is None:
        raise DgmrError("this run was started with in-memory models or data: pass them again to resume")
    return teacher, student, data


def resumed_val_data(saved: dict[str, Any], val_data: Any) -> Any:
    """The held-out images a resumed run evaluates on: the run's own. A run that held out a
    slice of its data takes no --val-data; one given --val-data takes it from run_config (a path)
    or again from the caller (in-memory images), and refuses a different path."""
    held = saved.get("held_out") or {}
    recorded = saved.get("val_data")
    if not held.get("val_data"):
        if val_data is not None:
            raise DgmrError("--resume continues with the run's held-out images: it held out a slice of its data "
                            "(or none), not --val-data")
        return None
    if val_data is None:
        if recorded is None:
            raise DgmrError("this run was started with in-memory held-out images: pass val_data again to resume")
        return recorded
    if recorded is not None and os.fspath(val_data) != recorded:
        raise DgmrError(f"--resume continues with the run's held-out images; --val-data was {recorded}, now {val_data}")
    return val_data


def check_resumed_held_out(saved: dict[str, Any] | None, held_out: Any) -> None:
    """A resumed run must hold out the very images it started with (the data may have changed)."""
    recorded = (saved or {}).get("held_out")
    now = held_out.summary() if held_out is not None else None
    if (recorded or {}).get("digest") != (now or {}).get("digest"):
        was = f"{recorded['images']} images ({recorded['source']})" if recorded else "none"
        new = f"{now['images']} images ({now['source']})" if now else "none"
        raise DgmrError(f"--resume: the held-out images differ from the run's (was {was}, now {new}): "
                        "resume with the data and --val-data the run started with")


def resumed_workers(saved: dict[str, Any] | None, setting: int | None, workers: int, shards: bool) -> int:
    """DataLoader workers of a resumed run: the number it started with unless ``setting``
    (--workers) gives one; ``workers`` is what a new run would use."""
    if setting is None and saved and saved.get("workers") is not None:
        workers = int(saved["workers"])  # as the run started
    if shards and saved and saved.get("workers") not in (None, workers):
        # each DataLoader worker streams its own share of the shards: the order depends on their number
        raise DgmrError("resume a shard run with the same number of DataLoader workers: "
                        f"--workers {saved['workers']}")
    return workers


# ---------------------------------------------------------------------------------------
# metrics.jsonl


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
    """The training loss of a run's first metrics row that has one (a resumed run reports it
    as its ``first_loss``; the step-0 row holds only the val_loss)."""
    return next((r["loss"] for r in rows if r.get("loss") is not None), None)


def last_logged_loss(rows: list[dict[str, Any]]) -> float | None:
    """The training loss of the last row kept (the checkpoint's step is always logged): the
    final loss of a run resumed after its last step, which trains no further step."""
    return next((r["loss"] for r in reversed(rows) if r.get("loss") is not None), None)


class MetricsLog:
    """What a run records as it trains: metrics.jsonl and, when the ``tensorboard`` setting asks
    and the package is installed, TensorBoard scalars under ``tensorboard/``. Only the
    ``enabled`` one (rank 0's) writes."""

    SCALARS = ("loss", "loss_pooled", "loss_tokens", "val_loss", "val_loss_pooled", "val_loss_tokens", "lr",
               "images_per_s")

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, step: int):
        self.path, self.enabled, self.writer = out / METRICS, enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run's events past its checkpoint were not kept in metrics.jsonl either
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1)
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, row)
        if self.writer is not None:
            for k in self.SCALARS:
                if k in row:
                    self.writer.add_scalar(f"distill/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------
# run_config.json and summary.json


def _as_path(x: Any) -> str | None:
    return str(x) if not isinstance(x, nn.Module) else None


def run_config(teacher: Any, student: Any, data: Any, settings: DistillSettings, *, world_size: int,
               global_batch: int, peak_lr: float, warmup_steps: int, total_steps: int, steps_per_epoch: int,
               image_size: int, data_config: dict[str, Any], family: str, data_description: str, workers: int,
               precision: str, val_data: Any = None, held_out: dict[str, Any] | None = None,
               eval_every: int | None = None, lr_choice: dict[str, Any] | None = None) -> dict[str, Any]:
    """run_config.json: the resolved settings and the numbers derived from them: the held-out
    images (``held_out``: how many, where from, a digest a resume checks) and the peak lr's choice."""
    return {
        "teacher": _as_path(teacher), "student": _as_path(student),
        "data": str(data) if isinstance(data, (str, os.PathLike)) else None,
        "val_data": str(val_data) if isinstance(val_data, (str, os.PathLike)) else None,
        "held_out": None if held_out is None else {**held_out, "val_data": val_data is not None},
        "eval_every": eval_every if held_out else None, "lr_choice": lr_choice,
        "settings": settings.to_json(), "world_size": world_size, "global_batch": global_batch,
        "peak_lr": peak_lr, "warmup_steps": warmup_steps, "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch, "image_size": image_size, "mean": data_config["mean"],
        "std": data_config["std"], "family": family, "data_description": data_description,
        "workers": workers, "precision": precision,
        "random_init_seeded": True}  # --random-init models come from settings.seed


def run_summary(state: TrainState, settings: DistillSettings, *, out: Path, teacher: Any, student: Any, family: str,
                steps_per_epoch: int, global_batch: int, peak_lr: float, source: DataSource, world_size: int,
                ranks_identical: bool, resumed: bool, seconds: float, unreadable: list[str]) -> dict[str, Any]:
    """summary.json (less its ``export``, known once the student is written): what
    :func:`~dgmr.distill.distill` returns."""
    def name(x: Any) -> str:
        return str(x) if not isinstance(x, nn.Module) else type(x).__name__

    return {
        "out": str(out), "teacher": name(teacher), "student": name(student),
        "family": family, "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 3) if steps_per_epoch else None,
        "global_batch": global_batch, "peak_lr": peak_lr, "first_loss": state.first_loss,
        "final_loss": state.last_loss, "images_seen": state.images_seen, "unreadable_images": len(unreadable),
        "unreadable_examples": unreadable[:5], "ignored_files": source.ignored_files,
        "world_size": world_size, "ranks_identical": ranks_identical, "resumed": resumed,
        "ema": settings.ema, "seconds": round(seconds, 2),
        "images_per_s": round(state.images_seen / seconds, 2) if seconds > 0 and not resumed else None,
        **unreadable_report(state, settings.unreadable_warn),
    }


def unreadable_report(state: TrainState, threshold: float) -> dict[str, Any]:
    """The fraction of image reads that failed; above ``threshold`` (the ``unreadable_warn``
    setting), a ``warning``: the run learned from less data than it was given."""
    reads = state.images_seen + state.unreadable_reads
    fraction = state.unreadable_reads / reads if reads else 0.0
    out: dict[str, Any] = {"unreadable_fraction": round(fraction, 4)}
    if fraction > threshold:
        out["warning"] = (f"{fraction:.0%} of the image reads failed ({state.unreadable_reads} of {reads}; "
                          f"threshold {threshold:.0%}): check the data "
                          f"({', '.join(sorted(state.unreadable)[:3])} ...)")
    return out


# ---------------------------------------------------------------------------------------
# the exported student


def export_student(student: nn.Module, out: Path, src: Source | None, student_cfg: dict | None, dtype: torch.dtype,
                   distill_info: dict[str, Any], student_dir: Path | None) -> dict[str, Any]:
    """Write the student into ``out`` as ``dgmr prune`` does (dgmr.json written last, so a
    directory with a dgmr.json is a complete model)."""
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
        if student_dir is not None:
            copy_kept_indices(student_dir, tmp)  # checked when the run started
    except BaseException as e:  # a full disk (save raised one DgmrError), a signal: no half export left
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise storage_error(out, e, "the exported student in") from None
        raise
    names = sorted(p.name for p in tmp.iterdir() if p.name != CONFIG) + [CONFIG]
    for name in names:
        dst = out / name
        if dst.is_dir() and not dst.is_symlink():  # a folder cannot be replaced in one rename
            discard(dst)
        os.replace(tmp / name, dst)
    tmp.rmdir()
    try:  # an older dgmr's export of this run, resumed: its files would mislead a library opening the folder
        for stale in legacy_leftovers(out):
            discard(stale)
    except OSError as e:
        raise storage_error(out, e, "the old layout's files in") from None
    sync_dir(out)
    return config
