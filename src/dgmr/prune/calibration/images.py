"""The calibration images: what ``--data`` takes (decoded with the model's eval transform)
or preprocessed tensors, batches a user's loader yields; kept in memory, every pass reads them again."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ...core.errors import DgmrError
from ...data.unlabeled import ImageDataset, ShardImages, resolve_data
from .settings import CalibrationSettings


# ---------------------------------------------------------------------------------------------
# calibration data
class EvalTransform:
    """Adapts the model's eval transform to the distillation datasets' (image, generator) call."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.transform(img)


@dataclass
class CalibrationData:
    """Preprocessed calibration batches, kept in memory: every layer's pass reads them again."""

    batches: list[torch.Tensor]
    unreadable: int = 0
    description: str = ""
    decoded: bool = False  # decoded here with the model's eval transform (not handed in preprocessed)

    @property
    def images(self) -> int:
        return sum(b.shape[0] for b in self.batches)


def _batched(tensors: Iterable[torch.Tensor], n: int, batch_size: int) -> list[torch.Tensor]:
    """Up to ``n`` images from an iterable of (B, 3, H, W) or (3, H, W) tensors, re-batched."""
    pending: list[torch.Tensor] = []
    taken = 0
    for t in tensors:
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4:
            raise DgmrError(f"calibration tensors must be (B, 3, H, W) image batches, got shape {tuple(t.shape)}")
        t = t[: n - taken]
        pending.append(t.float())
        taken += t.shape[0]
        if taken >= n:
            break
    return list(torch.cat(pending).split(batch_size)) if pending else []


def _from_loader(loader: Iterable, n: int, batch_size: int) -> list[torch.Tensor]:
    """Batches a user's DataLoader (already preprocessed) yields; (images, labels) pairs are fine."""
    return _batched((_images_of(b) for b in loader), n, batch_size)


def _images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a loader's batch: itself, the first of a tuple, or a dict's
    ``pixel_values``/``image``/``images`` (Hugging Face and WebDataset conventions)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        key = next((k for k in ("pixel_values", "image", "images") if k in batch), None)
        if key is None:
            raise DgmrError(f"a calibration batch is a dict without pixel_values/image/images (keys: {sorted(batch)})")
        batch = batch[key]
    if not isinstance(batch, torch.Tensor):
        raise DgmrError(f"a calibration batch is a {type(batch).__name__}, not an image tensor")
    return batch


def _decode(source: Any, transform: EvalTransform, n: int, seed: int) -> tuple[list[torch.Tensor], int]:
    """Decode ``n`` readable images of a resolved ``--data`` source (a seeded sample of files,
    or the first ones of shards); returns (images, unreadable count)."""
    if source.kind == "shards":  # an endless stream: at most one pass over it
        limit = source.num_samples if source.num_samples is not None else 10 * n
        samples = itertools.islice(ShardImages(source.items, transform, seed=seed), limit)
    else:
        ds = ImageDataset(source.items, transform, seed=seed)
        samples = (ds[i] for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist())
    images: list[torch.Tensor] = []
    bad = 0
    for x, _name in samples:
        if x is None:
            bad += 1
            continue
        images.append(x)
        if len(images) >= n:
            break
    return images, bad


def calibration_data(data: Any, transform: Callable, settings: CalibrationSettings, *, seed: int = 0) -> CalibrationData:
    """Resolve calibration ``data``: what ``dgmr distill --data`` takes (a folder, a list file,
    WebDataset shards, a list of PIL images or paths, or a Dataset), decoded with
    ``transform``; or already preprocessed images (a (N, 3, H, W) tensor, a list of image
    tensors, a DataLoader or an iterable of batches)."""
    n, bs = settings.calibration_images, settings.calibration_batch_size
    if isinstance(data, CalibrationData):
        cal = data
    elif isinstance(data, torch.Tensor):
        cal = CalibrationData(_batched([data], n, bs), 0, f"a tensor of {data.shape[0]} images")
    elif isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        cal = CalibrationData(_batched(data, n, bs), 0, f"{len(data)} tensors")
    elif isinstance(data, torch.utils.data.DataLoader) or (
            isinstance(data, Iterable) and not isinstance(data, (str, bytes, list, tuple))
            and not isinstance(data, torch.utils.data.Dataset) and not hasattr(data, "__fspath__")):
        cal = CalibrationData(_from_loader(data, n, bs), 0, "a data loader")
    else:
        source = resolve_data(data)
        images, bad = _decode(source, EvalTransform(transform), n, seed)
        if not images:
            raise DgmrError(f"no readable calibration image in {source.description} ({bad} unreadable)")
        cal = CalibrationData(list(torch.stack(images).split(bs)), bad, source.description, decoded=True)
    if not cal.batches:
        raise DgmrError(f"no calibration images in {cal.description or 'the calibration data'}")
    return cal
