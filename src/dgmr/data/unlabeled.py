"""Unlabeled images, for distillation, calibration and evaluation: folders, path lists, WebDataset
shards, in-memory images (:func:`resolve_data`), their datasets and the run sampler.

Every source yields transformed image tensors and ignores labels. Augmentation is
RandomResizedCrop(scale 0.2-1) + horizontal flip at the model's input size, normalised with
the model's own mean/std. The random crop and flip of one image are drawn from a generator
seeded by (seed, epoch, sample index), so a batch is the same whatever the number of
DataLoader workers, and a resumed run sees exactly the images and crops it would have seen.

Unreadable or corrupt images are not fatal: the loader drops them from their batch and
reports them (see :func:`collate`), and the training loop counts them.

:func:`split_held_out` sets a fixed, seeded slice of a source aside (distillation's held-out
images, never trained on): listed items are taken out of the list; WebDataset samples are read
from the first shards in a seeded order and skipped by the training stream (``exclude``).
"""
from __future__ import annotations

import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from ..core import dist as D
from ..core.errors import DgmrError
from ..io.images import IMAGE_EXTENSIONS, UnreadableImage, open_image, printable, to_rgb

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


@dataclass
class TrainTransform:
    """RandomResizedCrop(size, scale) + horizontal flip + normalisation, with explicit randomness.

    Called as ``transform(img, generator)``; ``img`` is a PIL image or a (3, H, W) tensor
    (uint8, or float in [0, 1]). The crop box is drawn by torchvision's own
    ``RandomResizedCrop.get_params`` under a forked RNG seeded from ``generator``.
    """

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, img: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also poke every accelerator
            top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
            flip = self.flip and bool(torch.rand(1) < 0.5)
        size = [self.image_size, self.image_size]
        if isinstance(img, torch.Tensor):
            x = img.float() / 255 if img.dtype == torch.uint8 else img.float()
            # what TF.resized_crop does to a float tensor (the box lies inside the image), without
            # its wrappers: small in-memory images are cropped thousands of times a second
            x = torch.nn.functional.interpolate(x[None, :, top:top + h, left:left + w], size=size, mode="bicubic",
                                                align_corners=False, antialias=True)[0].clamp_(0, 1)
        else:
            x = TF.to_tensor(TF.resized_crop(img, top, left, h, w, size, InterpolationMode.BICUBIC))
        if flip:
            x = x.flip(-1)
        return x.sub_(self._mean).div_(self._std)  # TF.normalize's arithmetic, the tensors made once

    def __post_init__(self) -> None:
        self._mean = torch.tensor(list(self.mean), dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(list(self.std), dtype=torch.float32).view(-1, 1, 1)


@dataclass
class EvalTransform:
    """A model's evaluation transform (a PIL image in, a normalised tensor out) called as
    :class:`TrainTransform` is: an in-memory tensor becomes an 8-bit PIL image first, and the
    generator is not used (nothing is random)."""

    transform: Callable[[Image.Image], torch.Tensor]

    def __call__(self, img: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            x = img if img.dtype == torch.uint8 else (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
            img = TF.to_pil_image(x)
        return self.transform(img)


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes held in memory (a held-out WebDataset sample), with its name."""

    name: str
    data: bytes


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that decides the crop and flip of sample ``index`` in ``epoch``."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63)


class ImageDataset(Dataset):
    """Map-style images from files (paths), PIL images, or another dataset of image tensors.

    Items are looked up as ``dataset[(epoch, index)]`` (see :class:`RunSampler`) and
    return ``(tensor, None)`` or ``(None, name)`` when the image cannot be read.
    """

    def __init__(self, items: Sequence[Any] | Dataset, transform: TrainTransform, seed: int = 0,
                 name: str = "images"):
        self.items, self.transform, self.seed, self.name = items, transform, seed, name

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def _load(self, index: int) -> Image.Image | torch.Tensor:
        item = self.items[index]
        if isinstance(item, (tuple, list)):  # (image, label) from a labelled dataset: label ignored
            item = item[0]
        if isinstance(item, (str, os.PathLike)):
            return open_image(item)
        if isinstance(item, EncodedImage):
            return open_image(item.data, name=item.name)
        if isinstance(item, Image.Image):
            return to_rgb(item, f"{self.name}[{index}]")
        if isinstance(item, torch.Tensor) and item.ndim == 3 and item.shape[0] in (1, 3):
            return item.expand(3, -1, -1) if item.shape[0] == 1 else item
        raise ValueError(f"item {index} is a {type(item).__name__}, not an image")

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor | None, str | None]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            img = self._load(index)
            return self.transform(img, sample_generator(self.seed, epoch, index)), None
        except (UnreadableImage, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"{self.where(index)}: {_reason(e)}"

    def where(self, index: int) -> str:
        """Item ``index`` as the list of unreadable images names it."""
        item = self.items[index]
        if isinstance(item, (str, os.PathLike)):
            return printable(os.fspath(item))
        return printable(item.name) if isinstance(item, EncodedImage) else f"{self.name}[{index}]"


def _identity(x: Any) -> Any:
    return x


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/key.ext.ext2`` -> (``dir/key``, ``ext.ext2``)."""
    d, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def count_shard_samples(url: str) -> int:
    """Number of samples with an image in one local tar shard (headers only)."""
    keys = set()
    try:
        with tarfile.open(url, "r:*") as tf:
            for m in tf:
                key, ext = _sample_key(m.name)
                if m.isfile() and ("." + ext.rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS:
                    keys.add(key)
    except (OSError, tarfile.TarError) as e:
        raise DgmrError(f"cannot read shard {url}: {e}") from e
    return len(keys)


class ShardImages(IterableDataset):
    """Images streamed from WebDataset tar shards (LAION style), read with ``webdataset``.

    An infinite stream: pass p goes through the shards in an order shuffled with
    (seed, p). Shards are split across (rank, worker) streams when there are enough of
    them, otherwise every stream reads all shards and keeps every n-th sample. The
    stream for DataLoader worker w starts ``skip_batches`` of its batches late, without
    decoding them (resume). Samples named in ``exclude`` (held out) are passed over."""

    def __init__(self, urls: Sequence[str], transform: TrainTransform, *, seed: int = 0, rank: int = 0,
                 world: int = 1, batch_size: int = 1, skip_batches: int = 0, samples_per_pass: int | None = None,
                 exclude: frozenset[str] = frozenset()):
        self.urls, self.transform, self.seed = list(urls), transform, seed
        self.rank, self.world, self.batch_size, self.skip_batches = rank, world, batch_size, skip_batches
        self.samples_per_pass, self.exclude = samples_per_pass, exclude

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, str | None]]:
        import webdataset as wds

        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batch j from worker j % nworkers. Resumed at batch skip_batches, worker w
        # serves what the uninterrupted run's worker (skip_batches + w) % nworkers served next: play
        # that worker's stream and skip its share of the batches already trained on.
        logical = (self.skip_batches + wid) % nworkers
        streams, stream = self.world * nworkers, self.rank * nworkers + logical
        split_shards = len(self.urls) >= streams
        skip = len(range(logical, self.skip_batches, nworkers)) * self.batch_size
        p = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 7919 + p)
            order = [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]
            if split_shards:
                order = order[stream::streams]
            pipe = wds.WebDataset(order, shardshuffle=False, nodesplitter=_identity, workersplitter=_identity,
                                  empty_check=False, handler=wds.warn_and_continue)
            decoded = skipped = 0
            for n, sample in enumerate(pipe):
                if not split_shards and n % streams != stream:
                    continue
                where, data = sample_image(sample)
                if data is None or where in self.exclude:
                    continue
                if skip:
                    skip -= 1
                    skipped += 1
                    continue
                try:
                    img = open_image(data, name=where)
                except (UnreadableImage, OSError, ValueError) as e:
                    yield None, f"{where}: {_reason(e)}"
                    continue
                decoded += 1
                yield self.transform(img, sample_generator(self.seed, p, hash_str(where))), None
            if not decoded and not skipped:
                return  # a whole pass without one readable image (none, or all corrupt): let the loader end
            p += 1


def sample_image(sample: dict[str, Any]) -> tuple[str, bytes | None]:
    """A WebDataset sample's name (``url:key``) and its image bytes (None: no image in it)."""
    data = next((v for k, v in sample.items() if "." + k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
                 and isinstance(v, bytes)), None)
    return printable(f"{sample.get('__url__', '?')}:{sample.get('__key__', '')}"), data


def hash_str(s: str) -> int:
    """A stable (not per-process randomised) 63-bit hash of a string."""
    import hashlib

    # surrogatepass: a name that is not UTF-8 (a tar member, a file name) holds lone surrogates
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") >> 1


def _reason(e: BaseException) -> str:
    """Why an image was skipped, for the run's list of unreadable images: open_image's own
    reason (its message without the name) or the exception type."""
    return e.reason if isinstance(e, UnreadableImage) else type(e).__name__


def collate(batch: list[tuple[torch.Tensor | None, str | None]]) -> tuple[torch.Tensor | None, list[str]]:
    """Stack the readable images of a batch; return the names of the unreadable ones."""
    good = [x for x, _ in batch if x is not None]
    bad = [name for x, name in batch if x is None and name is not None]
    return (torch.stack(good) if good else None), bad


@dataclass
class DataSource:
    """What ``--data`` resolved to: ``kind`` in {files, memory, shards}; ``items`` are paths,
    in-memory images or a Dataset (files/memory) or shard URLs (shards)."""

    kind: str
    items: Any
    description: str
    num_samples: int | None  # None: unknown (remote shards)
    ignored_files: int = 0
    exclude: frozenset[str] = frozenset()  # shards: the samples held out (:func:`split_held_out`)


def expand_shards(spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def is_shard_spec(spec: str) -> bool:
    s = spec.lower()
    return s.endswith(SHARD_EXTENSIONS) or ("{" in s and ".tar" in s) or s.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))


def resolve_data(data: Any) -> DataSource:
    """Resolve ``--data``: a directory of images (any nesting), a text file of image paths,
    WebDataset shards (``shards-{0000..0099}.tar``, or a directory holding only ``.tar``
    files), a list of PIL images / image tensors / paths, or a torch Dataset of images."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            raise DgmrError("the image dataset is empty")
        return DataSource("memory", data, f"{type(data).__name__} of {n} images", n)
    if isinstance(data, (list, tuple)):
        if not data:
            raise DgmrError("the image list is empty")
        return DataSource("memory", list(data), f"{len(data)} in-memory images", len(data))
    if not isinstance(data, (str, os.PathLike)):
        raise DgmrError(f"unsupported data {type(data).__name__}: give a directory, a .txt list, .tar shards, "
                        "a list of images or a torch Dataset")
    spec = str(data)
    path = Path(spec)
    if path.is_dir():
        # every entry but directories: a dangling link or a device named like an image is listed, and
        # its read fails with the reason (counted with the unreadable images), never skipped unseen
        files = sorted(p for p in path.rglob("*") if not p.is_dir()
                       and not any(s.startswith(".") for s in p.relative_to(path).parts))
        images = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        if images:
            return DataSource("files", images, f"{len(images)} images under {spec}", len(images), len(files) - len(images))
        shards = [str(p) for p in files if p.name.lower().endswith(SHARD_EXTENSIONS)]
        if shards:
            return _shards(shards, f"{len(shards)} shards under {spec}")
        raise DgmrError(f"no images in {spec} ({len(files)} files, none with an image extension: "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    if is_shard_spec(spec):
        return _shards(expand_shards(spec), spec)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return DataSource("files", [spec], spec, 1)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DgmrError(f"cannot read the image list {spec}: {e.strerror or e}") from None
        if b"\0" in raw:
            raise DgmrError(f"{spec} is not a text file of image paths (binary); --data takes a directory, "
                            "a .txt list of image paths, or .tar shards")
        # file names need not be UTF-8: keep their bytes, as os.listdir does (surrogateescape)
        lines = raw.decode("utf-8", "surrogateescape").splitlines()
        paths = []
        for line in lines:
            line = line.split("\t", 1)[0].strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(str(p if p.is_absolute() else path.parent / p))
        if not paths:
            raise DgmrError(f"the image list {spec} is empty")
        return DataSource("files", paths, f"{len(paths)} images listed in {spec}", len(paths))
    if path.exists():  # a FIFO, a device, a socket: reading it could block or never end
        raise DgmrError(f"data {spec} is not a regular file or a directory")
    raise DgmrError(f"data {spec} does not exist")


def _shards(urls: list[str], description: str) -> DataSource:
    if not urls:
        raise DgmrError(f"no shards match {description}")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise DgmrError(f"shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing)")
    n = sum(count_shard_samples(u) for u in urls) if len(local) == len(urls) else None
    if n == 0:
        raise DgmrError(f"no images in the shards {description}")
    return DataSource("shards", urls, f"{len(urls)} shards ({description})", n)


def held_out_count(n: int | None, fraction: float, cap: int) -> int:
    """How many images a held-out slice of ``n`` takes: ``fraction`` of them rounded up, at
    most ``cap`` (``cap`` when ``n`` is unknown); 0 when ``fraction`` is 0."""
    if fraction <= 0 or cap <= 0:
        return 0
    return cap if n is None else min(cap, math.ceil(fraction * n))


def pick_images(source: DataSource, count: int, seed: int) -> list[Any]:
    """``count`` items of ``source`` (all of them when it holds fewer), chosen by ``seed``:
    a seeded permutation's first, or the first image samples of the shards in a seeded order."""
    if source.kind == "shards":
        return _shard_images(source.items, count, seed)
    n = source.num_samples
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [source.items[i] for i in sorted(order[:count])]


def split_held_out(source: DataSource, count: int, seed: int) -> tuple[DataSource, list[Any]]:
    """(the training source, ``count`` held-out items): a fixed slice of ``source`` chosen by
    ``seed``, which the training source no longer holds. Listed items: a seeded permutation's
    first ``count``; shards: the first ``count`` image samples of the shards in a seeded order."""
    if count <= 0:
        return source, []
    if source.kind == "shards":
        return _split_shards(source, count, seed)
    n = source.num_samples
    if count >= n:
        raise DgmrError(f"holding out {count} of the {n} images of {source.description} leaves none to train on: "
                        "lower --val-fraction or give --val-data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held, kept = sorted(order[:count]), sorted(order[count:])
    items = source.items
    if isinstance(items, Dataset):
        train_items: Any = torch.utils.data.Subset(items, kept)
        val = [items[i] for i in held]
    else:
        train_items, val = [items[i] for i in kept], [items[i] for i in held]
    train = DataSource(source.kind, train_items, f"{source.description} less {count} held out", n - count,
                       source.ignored_files)
    return train, val


def _shard_images(urls: list[str], count: int, seed: int) -> list[EncodedImage]:
    """The first ``count`` image samples of the shards in a seeded order, held in memory."""
    import webdataset as wds

    order = torch.randperm(len(urls), generator=torch.Generator().manual_seed(seed)).tolist()
    held: list[EncodedImage] = []
    for i in order:
        pipe = wds.WebDataset([urls[i]], shardshuffle=False, nodesplitter=_identity, workersplitter=_identity,
                              empty_check=False, handler=wds.warn_and_continue)
        for sample in pipe:
            where, data = sample_image(sample)
            if data is not None:
                held.append(EncodedImage(where, data))
            if len(held) == count:
                return held
    return held


def _split_shards(source: DataSource, count: int, seed: int) -> tuple[DataSource, list[Any]]:
    held = _shard_images(source.items, count, seed)
    n = source.num_samples
    if n is not None and len(held) >= n:
        raise DgmrError(f"holding out {len(held)} of the {n} images of {source.description} leaves none to train on: "
                        "lower --val-fraction or give --val-data")
    train = DataSource("shards", source.items, f"{source.description} less {len(held)} held out",
                       None if n is None else n - len(held), source.ignored_files,
                       frozenset(h.name for h in held))
    return train, held


class RunSampler(torch.utils.data.Sampler):
    """``(epoch, index)`` pairs for every epoch from ``epoch`` on, without end: each epoch is
    the :class:`DistributedSampler` order of this rank (reshuffled per epoch), cut to
    ``per_epoch`` items (whole batches), the first epoch skipping ``skip`` items (resuming)."""

    def __init__(self, ds: Dataset, info: D.DistInfo, *, seed: int, per_epoch: int, epoch: int, skip: int):
        self.ds, self.info, self.seed = ds, info, seed
        self.per_epoch, self.epoch, self.skip = per_epoch, epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from torch.utils.data import DistributedSampler

        epoch, skip = self.epoch, self.skip
        while True:
            order = DistributedSampler(self.ds, num_replicas=self.info.world, rank=self.info.rank, shuffle=True,
                                       seed=self.seed, drop_last=True)
            order.set_epoch(epoch)
            for i, idx in enumerate(order):
                if i >= self.per_epoch:
                    break
                if i >= skip:
                    yield epoch, idx
            epoch, skip = epoch + 1, 0


def data_paths(data: Any) -> list[str]:
    """The paths ``--data`` reads: a folder, a list file, WebDataset shards, or the path
    items of an in-memory list (images and tensors are not paths)."""
    if isinstance(data, (list, tuple)):
        return sorted({os.fspath(x) for x in data if isinstance(x, (str, os.PathLike))})
    if not isinstance(data, (str, os.PathLike)):
        return []
    s = os.fspath(data)
    paths = [s]
    if not os.path.exists(s) and is_shard_spec(s):
        try:
            paths = expand_shards(s)
        except Exception:  # noqa: BLE001 - resolve_data reports a bad pattern
            pass
    return [p for p in paths if "://" not in p and not p.startswith("pipe:")]  # URLs and pipes are not local paths
