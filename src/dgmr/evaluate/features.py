"""Feature extraction for evaluation, with an on-disk cache.

One code path alone (CPU or one GPU) and under ``torchrun``: when ``torch.distributed`` is
initialised, each rank takes its :class:`~torch.utils.data.DistributedSampler` share, keeps
the dataset index of every feature, and the shares are all-gathered and written back by
index, so the sampler's padding (repeated samples) is harmless and every rank ends with the
full, ordered feature matrix.

Cached features live in ``<cache>/<key>.safetensors`` where the key hashes the model's
weights, the dataset listing, the transform and the feature kind, so repeated evaluations
and k sweeps never re-extract.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core import dist as D
from ..core.errors import DgmrError, first_line
from ..core.signals import ignore_stop_signals
from ..io.output import atomic_path

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def default_cache_dir() -> Path:
    """``$DGMR_CACHE/features``, else ``$XDG_CACHE_HOME/dgmr/features`` (``~/.cache/dgmr/features``)."""
    if os.environ.get("DGMR_CACHE"):
        return Path(os.environ["DGMR_CACHE"]) / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dgmr" / "features"


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:32]


def pooled_features(model: nn.Module, family: Any) -> FeatureFn:
    """The CLS/pooled feature of ``family.features`` (what kNN and the linear probe use)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return family.features(model, x)["pooled"]
    return fn


@torch.no_grad()
def extract_features(
    fn: FeatureFn,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn`` over ``dataset`` (items ``(image, label, index)``); returns ``(features
    float32 (N, D) on CPU, labels int64 (N,))`` in dataset order on every rank."""
    import torch.distributed as dist

    rank, world = D.rank_world()
    n = len(dataset)
    if n == 0:
        raise DgmrError("cannot extract features from an empty dataset")
    sampler = None
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
    feats, labels, idxs = [], [], []
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    for x, y, i in tqdm(_batches(loader), desc=desc, disable=not progress or rank != 0, leave=False):
        with autocast:
            f = fn(x.to(device, non_blocking=True))
        if f.ndim != 2:
            f = f.flatten(1)
        if not torch.isfinite(f).all():
            raise DgmrError("the model produced NaN/inf features")
        feats.append(f.float())  # float32: fp16 storage moved zero-shot/retrieval scores off clip_benchmark's
        labels.append(torch.as_tensor(y, device=device))
        idxs.append(torch.as_tensor(i, device=device))
    f, y, i = torch.cat(feats), torch.cat(labels).long(), torch.cat(idxs).long()
    if world > 1:
        # every rank holds ceil(n / world) samples (the sampler pads by repeating): gather and scatter by index
        gather_dev = D.collective_device()
        f, y, i = f.to(gather_dev), y.to(gather_dev), i.to(gather_dev)
        fs = [torch.empty_like(f) for _ in range(world)]
        ys = [torch.empty_like(y) for _ in range(world)]
        is_ = [torch.empty_like(i) for _ in range(world)]
        dist.all_gather(fs, f.contiguous())
        dist.all_gather(ys, y.contiguous())
        dist.all_gather(is_, i.contiguous())
        f, y, i = torch.cat(fs), torch.cat(ys), torch.cat(is_)
    out_f = torch.empty(n, f.shape[1], dtype=torch.float32)
    out_y = torch.empty(n, dtype=torch.long)
    seen = torch.zeros(n, dtype=torch.bool)
    i = i.cpu()
    out_f[i] = f.cpu()
    out_y[i] = y.cpu()
    seen[i] = True
    if not bool(seen.all()):
        raise DgmrError(f"feature extraction missed {int((~seen).sum())} of {n} samples")
    return out_f, out_y


def _batches(loader: DataLoader):
    """The loader's batches; a DgmrError raised in a worker process comes back as one line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except DgmrError as e:  # workers re-raise with the worker traceback in the message
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise DgmrError(lines[-1].split("DgmrError: ", 1)[-1] if lines else "data loading failed") from None
        except (OSError, RuntimeError) as e:
            if not _too_many_files(e):
                raise
            raise DgmrError(f"too many open files while reading the images (the limit is {_open_files_limit()}, "
                            f"ulimit -n): raise it (ulimit -n 65536), or pass fewer --workers "
                            f"({loader.num_workers} now; each batch a worker hands over holds file descriptors)") from None
        yield batch


def _too_many_files(e: BaseException) -> bool:
    """EMFILE, or how a DataLoader reports it ("Too many open files. Communication with the workers ...")."""
    return getattr(e, "errno", None) == errno.EMFILE or "Too many open files" in str(e)


def _open_files_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"


KEY_FIELD = "dgmr_cache_key"  # the metadata field naming the key an entry was written for


def check_entry(d: dict[str, torch.Tensor], claimed: str | None, key: str, n: int | None = None) -> None:
    """Raise ValueError unless a cache entry is what :meth:`FeatureCache.put` writes for ``key``:
    the key it claims, float32 features (N, D) of finite values, int64 labels (N,), N = ``n``."""
    if claimed != key:
        raise ValueError(f"it claims the key {claimed!r}" if claimed else "it records no key")
    f, y = d.get("features"), d.get("labels")
    if f is None or y is None or set(d) != {"features", "labels"}:
        raise ValueError(f"it holds {sorted(d)}, not features and labels")
    if f.dtype != torch.float32 or y.dtype != torch.int64:
        raise ValueError(f"features are {f.dtype}, labels {y.dtype} (float32, int64 expected)")
    if f.ndim != 2 or y.ndim != 1 or f.shape[0] != y.shape[0] or f.shape[1] == 0 or (n is not None and len(y) != n):
        raise ValueError(f"features of shape {tuple(f.shape)}, labels of shape {tuple(y.shape)}"
                         + (f" for {n} images" if n is not None else ""))
    bad = int((~torch.isfinite(f)).sum())
    if bad:
        raise ValueError(f"{bad} NaN or infinite feature values")


class FeatureCache:
    """Features on disk as safetensors, keyed by a hash; writes are atomic and durable
    (:func:`~dgmr.io.output.atomic_path`) and only rank 0 writes; each entry is checked when read
    (:func:`check_entry`). ``FeatureCache(None)`` caches nothing."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.safetensors"

    def get(self, key: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry of ``key`` if it is sound (:func:`check_entry`; ``n``: the rows it must
        have), else None: a damaged or wrong entry is recomputed, with a warning."""
        p = self.path(key)
        if p is None or not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                claimed = (f.metadata() or {}).get(KEY_FIELD)
                d = {name: f.get_tensor(name) for name in f.keys()}
            check_entry(d, claimed, key, n)
        except (SafetensorError, OSError, ValueError) as e:
            warnings.warn(f"feature cache entry {p} is unusable ({first_line(e)}): computing the features again")
            return None
        self.hits += 1
        return d["features"], d["labels"]

    def put(self, key: str, feats: torch.Tensor, labels: torch.Tensor, meta: dict[str, str]) -> None:
        p = self.path(key)
        if p is None or D.rank_world()[0] != 0:
            return
        try:  # the cache only saves time: a full or read-only disk must not cost the evaluation
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DgmrError(f"cannot create the feature cache {p.parent}: {e.strerror or e}") from None
            # own_dir: safetensors writes a .tmpXXXXXX of its own beside its target, which a kill would leave
            with atomic_path(p, "a feature cache entry", own_dir=True) as tmp:
                save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp),
                          metadata={**{k: str(v) for k, v in meta.items()}, KEY_FIELD: key})
        except DgmrError as e:
            warnings.warn(f"{e}; going on without the feature cache")
            self.root = None

    def features(self, key_parts: dict[str, str], compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached features for ``key_parts`` (a dict of strings), else ``compute()`` and store."""
        key = cache_key(*(f"{k}={v}" for k, v in sorted(key_parts.items())))
        n = key_parts.get("n")
        hit = self.get(key, int(n) if n is not None and str(n).isdigit() else None)
        rank, world = D.rank_world()
        if world > 1:  # every rank must agree, or the others would wait forever in all_gather
            import torch.distributed as dist

            flag = torch.tensor([1 if hit is not None else 0], device=D.collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not int(flag.item()):
                hit = None
        if hit is not None:
            return hit
        self.misses += 1
        feats, labels = compute()
        self.put(key, feats, labels, {k: v[:200] for k, v in key_parts.items()})
        return feats, labels
