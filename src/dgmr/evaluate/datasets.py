"""Labeled evaluation data: ImageFolder-style splits and caption files, with the standard
evaluation transform (resize to size/0.875, i.e. 256 for 224, then center crop) in the
model's own normalisation.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DgmrError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CROP_PCT = 224 / 256


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = CROP_PCT) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``image_size / crop_pct`` (256 for 224), center-crop
    ``image_size``, scale to [0, 1] and normalise with the model's ``mean``/``std``."""
    from torchvision import transforms as T

    if not image_size or image_size <= 0:
        raise DgmrError(f"image size must be a positive integer, got {image_size}")
    resize = int(round(image_size / crop_pct))
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std)),
    ])


def describe_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                       crop_pct: float = CROP_PCT) -> str:
    """A stable text form of :func:`eval_transform`'s settings (part of the feature-cache key)."""
    return json.dumps({"resize": int(round(image_size / crop_pct)), "crop": int(image_size),
                       "interp": "bicubic", "mean": [round(float(m), 8) for m in mean],
                       "std": [round(float(s), 8) for s in std]}, sort_keys=True)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DgmrError(f"cannot read image {path}: {e}") from e


class ImageFolderSplit(Dataset):
    """``root/CLASS/**/IMAGE`` (classes = sorted sub-directory names, like torchvision's
    ImageFolder). Items are ``(image, label, index)``; the index lets distributed feature
    extraction put every feature back in its place."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DgmrError(f"data directory {self.root} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DgmrError(f"{self.root} has no class sub-directories (expected ImageFolder layout root/CLASS/IMAGE)")
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise DgmrError(f"{self.root} has class {unknown[0]!r} that the training split does not have")
        self.samples: list[tuple[Path, int]] = []
        for c in found:
            files = sorted(p for p in (self.root / c).rglob("*") if p.is_file() and _is_image(p))
            self.samples += [(p, index[c]) for p in files]
        if not self.samples:
            raise DgmrError(f"{self.root} is an empty split: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        path, label = self.samples[i]
        img = _open_rgb(path)
        return (self.transform(img) if self.transform else img), label, i

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.samples], dtype=torch.long)

    def listing_digest(self) -> str:
        """Hash of the listing (relative paths, sizes, mtimes, labels): part of the cache key."""
        h = hashlib.sha256()
        for p, y in self.samples:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}\t{st.st_size}\t{st.st_mtime_ns}\t{y}\n".encode())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()


class ImageListDataset(Dataset):
    """A list of image paths (retrieval). Items are ``(image, 0, index)``."""

    def __init__(self, paths: Sequence[Path], transform: Callable | None = None, root: Path | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.root = root
        if not self.paths:
            raise DgmrError("no images to evaluate")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        img = _open_rgb(self.paths[i])
        return (self.transform(img) if self.transform else img), 0, i

    def listing_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            st = p.stat()
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


@dataclass
class Captions:
    """Images (unique, in file order) and captions, with ``caption_image[j]`` = the image index of caption j."""

    images: list[Path]
    captions: list[str]
    caption_image: list[int]


_IMAGE_KEYS = ("image", "filepath", "file_name", "filename", "image_path", "img", "path")
_CAPTION_KEYS = ("caption", "captions", "text", "title", "sentences", "raw")


def _pick(d: dict[str, Any], keys: Sequence[str], what: str, where: str) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    raise DgmrError(f"{where}: an entry has no {what} field (looked for {', '.join(keys)})")


def _as_caption_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, dict):  # Karpathy split: sentences = [{"raw": ...}]
                v = _pick(v, _CAPTION_KEYS, "caption", where)
            if not isinstance(v, str):
                raise DgmrError(f"{where}: captions must be strings, got {type(v).__name__}")
            out.append(v)
        return out
    raise DgmrError(f"{where}: captions must be a string or a list of strings, got {type(value).__name__}")


def read_captions(path: str | os.PathLike, images_dir: str | os.PathLike) -> Captions:
    """Read a COCO/Flickr-style captions file: JSON (a list of ``{"image": PATH, "caption":
    str | [str]}``, a ``{PATH: [captions]}`` map, COCO ``{"images", "annotations"}`` or the
    Karpathy ``{"images": [{"filename", "sentences"}]}`` form) or CSV/TSV with a header
    (an image column and a caption column; several rows may share one image). Image paths
    are relative to ``images_dir``."""
    path, root = Path(path), Path(images_dir)
    if not path.is_file():
        raise DgmrError(f"captions file {path} does not exist")
    if not root.is_dir():
        raise DgmrError(f"images directory {root} does not exist")
    pairs: list[tuple[str, str]] = []
    where = str(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for row in reader:
                row = {(k or "").strip().lower(): v for k, v in row.items()}
                pairs.append((str(_pick(row, _IMAGE_KEYS, "image", where)), str(_pick(row, _CAPTION_KEYS, "caption", where))))
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DgmrError(f"{path} is neither CSV/TSV (by extension) nor valid JSON: {e}") from None
        if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO
            names = {im["id"]: im["file_name"] for im in data["images"]}
            for a in data["annotations"]:
                if a.get("image_id") not in names:
                    raise DgmrError(f"{where}: annotation for unknown image_id {a.get('image_id')!r}")
                pairs.append((names[a["image_id"]], str(a["caption"])))
        elif isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy split
            for e in data["images"]:
                name = str(_pick(e, _IMAGE_KEYS, "image", where))
                if e.get("filepath") and e.get("filename"):
                    name = f"{e['filepath']}/{e['filename']}"
                pairs += [(name, c) for c in _as_caption_list(_pick(e, ("sentences",) + _CAPTION_KEYS, "caption", where), where)]
        elif isinstance(data, dict):
            for name, caps in data.items():
                pairs += [(str(name), c) for c in _as_caption_list(caps, where)]
        elif isinstance(data, list):
            for e in data:
                if not isinstance(e, dict):
                    raise DgmrError(f"{where}: expected a list of objects with image and caption fields")
                name = str(_pick(e, _IMAGE_KEYS, "image", where))
                pairs += [(name, c) for c in _as_caption_list(_pick(e, _CAPTION_KEYS, "caption", where), where)]
        else:
            raise DgmrError(f"{where}: unsupported captions JSON layout")
    if not pairs:
        raise DgmrError(f"{where} holds no captions")
    order: dict[str, int] = {}
    images: list[Path] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for name, cap in pairs:
        if name not in order:
            p = root / name
            if not p.is_file():
                raise DgmrError(f"image {name!r} from {where} not found under {root}")
            order[name] = len(images)
            images.append(p)
        captions.append(cap)
        caption_image.append(order[name])
    return Captions(images, captions, caption_image)


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty lines of a text file, or the strings of a JSON list (class names, templates)."""
    path = Path(path)
    if not path.is_file():
        raise DgmrError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise DgmrError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise DgmrError(f"{path} must hold a JSON list of strings")
        lines = [x.strip() for x in data]
    else:
        lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DgmrError(f"{what} file {path} is empty")
    return lines
