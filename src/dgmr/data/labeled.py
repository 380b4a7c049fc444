"""Labeled evaluation data: ImageFolder-style splits, caption files, class-name and
template files (plain lists, or clip_benchmark's per-dataset JSON maps)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.errors import DgmrError
from ..io.files import read_text_file
from ..io.images import IMAGE_EXTENSIONS, UnreadableImage, open_image, printable


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _images_in(d: Path) -> tuple[list[Path], list[str]]:
    """(the image files under ``d``, "name: what it is" of each entry named like an image that is
    no regular file: a dangling link, a device, a FIFO or a socket; never opened)."""
    files, skipped = [], []
    for p in sorted(d.rglob("*")):
        if not _is_image(p) or p.is_dir():
            continue
        if p.is_file():
            files.append(p)
        else:
            skipped.append(f"{printable(str(p))}: {_what(p)}")
    return files, skipped


def _what(p: Path) -> str:
    try:
        mode = p.stat().st_mode
    except OSError:
        return "a dangling symbolic link" if p.is_symlink() else "unreadable"
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _stat(p: Path) -> os.stat_result:
    """The file's stat for a listing digest; a dangling link's own (its read fails later, with the reason)."""
    try:
        return p.stat()
    except OSError:
        try:
            return p.lstat()
        except OSError as e:
            raise DgmrError(f"cannot read image {p}: {e.strerror or e}") from None


def _open_rgb(path: Path) -> Image.Image:
    try:
        return open_image(path)
    except UnreadableImage as e:
        raise DgmrError(f"cannot read image {e}") from None


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
        self.skipped: list[str] = []  # entries named like images that are no regular files, with why
        for c in found:
            files, skipped = _images_in(self.root / c)
            self.samples += [(p, index[c]) for p in files]
            self.skipped += skipped
        if self.skipped:
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} entries named like images that are not regular "
                          f"files ({'; '.join(self.skipped[:3])}{' ...' if len(self.skipped) > 3 else ''})")
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
            st = _stat(p)
            # surrogateescape: a file name that is not UTF-8 hashes as its own bytes
            h.update(f"{p.relative_to(self.root)}\t{st.st_size}\t{st.st_mtime_ns}\t{y}\n".encode("utf-8", "surrogateescape"))
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
            st = _stat(p)
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
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


def _text(path: Path, what: str) -> str:
    """A class-name or template file's text: a regular UTF-8 file of bounded size (one error line otherwise)."""
    if not path.exists():
        raise DgmrError(f"{what} file {path} does not exist")
    return read_text_file(path, f"{what} file")


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(_text(path, what))
    except ValueError as e:
        raise DgmrError(f"{path} is not valid JSON: {e}") from None


def _non_empty(lines: list[str], path: Path, what: str) -> list[str]:
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DgmrError(f"{what} file {path} is empty")
    return lines


def _string_list(data: Any, path: Path, what: str) -> list[str]:
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DgmrError(f"{path} must hold a JSON list of strings")
    return _non_empty([x.strip() for x in data], path, what)


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty lines of a text file, or the strings of a JSON list (class names, templates)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _string_list(_json(path, what), path, what)
    return _non_empty([ln.strip() for ln in _text(path, what).splitlines()], path, what)


def read_named_lists(path: str | os.PathLike, what: str, dataset: str | None = None) -> list[str] | dict[str, list[str]]:
    """Class names or templates from a text file, a JSON list, or a JSON object. An object is
    either clip_benchmark's per-dataset layout (``en_classnames.json``,
    ``en_zeroshot_classification_templates.json``: ``{dataset: [...]}``; ``dataset`` picks the
    entry, a one-entry file needs none) or, for templates, per-class prompts
    (``{class name: [prompts]}``, e.g. CuPL), returned as that dict."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        return read_lines(p, what)
    data = _json(p, what)
    if isinstance(data, list):
        return _string_list(data, p, what)
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in data.values()):
        raise DgmrError(f"{p} must hold a JSON list of strings or an object of non-empty string lists")
    key = dataset if dataset in data else (dataset or "").replace("/", "_")
    if key in data:
        return [x.strip() for x in data[key]]
    if len(data) == 1:
        return [x.strip() for x in next(iter(data.values()))]
    if what == "templates":  # no dataset entry: class-specific prompts
        return {str(k): [x.strip() for x in v] for k, v in data.items()}
    raise DgmrError(f"{p} has no entry for dataset {dataset!r} (give --dataset NAME; it has "
                    f"{', '.join(sorted(data)[:8])}{' ...' if len(data) > 8 else ''})")
