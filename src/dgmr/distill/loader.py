"""This rank's stream of training micro-batches (:class:`Loader`): the image sources of
:mod:`dgmr.data.unlabeled` behind one DataLoader for the whole run, resumable at any micro-batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from ..core import dist as D
from ..core.errors import DgmrError
from ..core.signals import ignore_stop_signals
from ..data.unlabeled import DataSource, ImageDataset, RunSampler, ShardImages, TrainTransform, collate

if TYPE_CHECKING:
    from .settings import DistillSettings


@dataclass
class Loader:
    source: DataSource
    transform: TrainTransform
    info: D.DistInfo
    settings: "DistillSettings"
    workers: int
    pin: bool
    batches_per_epoch: int = field(init=False)  # per rank, micro-batches

    def __post_init__(self) -> None:
        s, world = self.settings, self.info.world
        n = self.source.num_samples
        if n is None:
            self.batches_per_epoch = 0  # unknown: streaming shards with --steps
            return
        per_rank = n // world
        self.batches_per_epoch = per_rank // s.batch_size
        if self.batches_per_epoch < s.accum:
            raise DgmrError(f"{self.source.description}: {n} images are fewer than one global batch "
                            f"({s.batch_size} x {world} process(es) x {s.accum} accumulation): lower --batch-size")

    def batches(self, start_micro: int, steps_per_epoch: int) -> Iterator[tuple[int, torch.Tensor | None, list[str]]]:
        """Endless (epoch, images, unreadable names) micro-batches from micro-batch ``start_micro``."""
        from torch.utils.data import DataLoader

        s, info = self.settings, self.info
        # a loader of its own RNG: starting it must not draw from the global one, which a resumed run
        # restores from the checkpoint (else dropout/drop-path draws shift by one after a resume)
        common = dict(batch_size=s.batch_size, collate_fn=collate, num_workers=self.workers, pin_memory=self.pin,
                      drop_last=True, generator=torch.Generator().manual_seed(s.seed),
                      worker_init_fn=ignore_stop_signals if self.workers > 0 else None)
        if self.source.kind == "shards":
            ds = ShardImages(self.source.items, self.transform, seed=s.seed, rank=info.rank, world=info.world,
                             batch_size=s.batch_size, skip_batches=start_micro, exclude=self.source.exclude)
            micro = start_micro
            for x, bad in DataLoader(ds, **common):
                yield (micro // (steps_per_epoch * s.accum) if steps_per_epoch else 0), x, bad
                micro += 1
            raise DgmrError(f"no readable images in {self.source.description}")
        ds = ImageDataset(self.source.items, self.transform, seed=s.seed,
                          name="images" if self.source.kind == "memory" else "files")
        per_epoch = steps_per_epoch * s.accum  # micro-batches used per epoch
        epoch, skip = divmod(start_micro, per_epoch)
        # one loader for the whole run: its workers never restart, so epoch boundaries do not stall
        sampler = RunSampler(ds, info, seed=s.seed, per_epoch=per_epoch * s.batch_size, epoch=epoch,
                             skip=skip * s.batch_size)
        extra = {"prefetch_factor": 4} if self.workers > 0 else {}
        readable = 0
        for x, bad in DataLoader(ds, sampler=sampler, **common, **extra):
            readable += 0 if x is None else x.shape[0]
            yield epoch, x, bad
            skip += 1
            if skip == per_epoch:  # batches never straddle epochs: each epoch is a whole number of them
                if readable == 0 and start_micro <= (epoch * per_epoch):
                    raise DgmrError(f"no readable images in {self.source.description}")
                epoch, skip, readable = epoch + 1, 0, 0


def default_workers(source: DataSource, info: D.DistInfo) -> int:
    if source.kind == "memory":
        return 0
    return max(0, min(8, D.usable_cpus() // info.world - 1))
