"""The held-out loss of a distillation run (``val_loss``) and what follows from it: the best
weights and when to stop.

:class:`HeldOut` holds this rank's share of the held-out images, decoded once with the
teacher's evaluation transform (no augmentation), and measures the feature loss of student
against teacher on them (:meth:`HeldOut.evaluate`). Each rank evaluates its own share and the
sums are all-reduced, so every rank gets the same value and each image is evaluated once; every
rank makes the same number of forward calls, as DDP and FSDP need. :class:`Tracker` follows the
step-0, best and latest values, early stopping and the target; :class:`BestWeights` keeps the
best weights. Both are saved in the checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..core import dist as D
from ..core.errors import DgmrError
from ..data.unlabeled import DataSource, EvalTransform, ImageDataset, held_out_count, pick_images, resolve_data, \
    split_held_out
from .losses import feature_loss
from .parallel import full_tensor, local_tensor
from .settings import DistillSettings

FEATURES = ("pooled", "tokens")


def held_out_images(source: DataSource, val_data: Any, settings: DistillSettings) -> tuple[DataSource, list[Any], str]:
    """(the training source, the held-out items, where they come from): ``val_data`` (at most
    ``val_images`` of it, a seeded choice), else a seeded slice of the data (``val_fraction``,
    at most ``val_images``) that the training source no longer holds; no items with neither."""
    if val_data is not None:
        val = resolve_data(val_data)
        items = pick_images(val, settings.val_images, settings.seed)
        return source, items, f"--val-data: {len(items)} of {val.description}"
    count = held_out_count(source.num_samples, settings.val_fraction, settings.val_images)
    train, items = split_held_out(source, count, settings.seed)
    return train, items, f"{len(items)} held out of --data ({source.description})"


@dataclass(frozen=True)
class ValLoss:
    """One evaluation: the loss and its two terms, averaged over the held-out images; with
    ``scale``, also the loss of the best constant prediction of the teacher's features (what
    a student that reproduced nothing of them would score)."""

    loss: float
    pooled: float
    tokens: float
    images: int
    scale: float | None = None

    def row(self) -> dict[str, float]:
        return {"val_loss": self.loss, "val_loss_pooled": self.pooled, "val_loss_tokens": self.tokens}


class HeldOut:
    """The held-out images of a run (``items``: paths, in-memory images, encoded samples) and
    the loss on them; ``transform`` is the teacher's evaluation transform (PIL in, tensor out)."""

    def __init__(self, items: list[Any], transform: Callable, info: D.DistInfo, *, batch_size: int,
                 image_size: int, description: str):
        self.count, self.info, self.batch_size, self.image_size = len(items), info, batch_size, image_size
        self.description = description
        ds = ImageDataset(items, EvalTransform(transform), name="held-out")
        names = "\n".join(ds.where(i) for i in range(len(items)))
        # what a resumed run checks: the same images are held out
        self.digest = hashlib.blake2b(names.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
        xs, self.unreadable = [], []
        for i in range(info.rank, len(items), info.world):
            x, bad = ds[i]
            if x is None:
                self.unreadable.append(bad)
            else:  # half precision: 512 images at 224 px are 150 MB, finer than the 8-bit files
                xs.append(x.half())
        self.x = torch.stack(xs) if xs else None
        self.batches = math.ceil(math.ceil(self.count / info.world) / batch_size)  # the same on every rank
        readable = D.all_reduce_sum(torch.tensor([float(len(xs))], device=info.device), info).item()
        if readable == 0:
            raise DgmrError(f"no readable image among the {self.count} held-out images ({description})")
        self.readable = int(readable)

    def summary(self) -> dict[str, Any]:
        return {"images": self.count, "readable": self.readable, "source": self.description, "digest": self.digest}

    @torch.no_grad()
    def evaluate(self, student: Callable, teacher: Callable, settings: DistillSettings,
                 autocast: Callable[[], contextlib.AbstractContextManager], *, scale: bool = False) -> ValLoss:
        """The loss of ``student`` against ``teacher`` (feature calls, in eval mode) on every
        held-out image; with ``scale``, :attr:`ValLoss.scale` too."""
        device = self.info.device
        sums = torch.zeros(4, device=device, dtype=torch.float64)
        moments = _Moments(device) if scale else None
        bs = self.batch_size
        for b in range(self.batches):
            x = self.x[b * bs:(b + 1) * bs] if self.x is not None else None
            m = 0 if x is None else len(x)
            if m == 0:  # this rank's share is used up: a call the others make too, counted for nothing
                x = torch.zeros(1, 3, self.image_size, self.image_size)
            x = x.to(device, torch.float32, non_blocking=True)
            with autocast():
                tf = teacher(x)
                sf = student(x)
            loss, lp, lt = feature_loss(sf, tf, settings.loss, settings.pooled_weight, settings.tokens_weight)
            sums += torch.stack([loss.detach(), lp, lt, torch.ones((), device=device)]).double() * m
            if moments is not None:  # a rank without images adds zeros, of the right length
                moments.add(tf, counted=m > 0)
        tot = D.all_reduce_sum(sums, self.info).tolist()
        n = max(tot[3], 1.0)
        value = None
        if moments is not None:
            value = moments.scale(self.info, settings)
        return ValLoss(tot[0] / n, tot[1] / n, tot[2] / n, int(tot[3]), value)


class _Moments:
    """Sums over the held-out images of the teacher's features, their squares and their unit
    vectors, per feature kind: the loss of the best constant prediction follows (MSE: the
    features' variance, averaged over dimensions; cosine: 1 - the length of the mean unit vector)."""

    def __init__(self, device: torch.device):
        self.device, self.sums = device, {}

    def add(self, feats: dict[str, torch.Tensor], counted: bool = True) -> None:
        for key in FEATURES:
            t = feats[key].detach().float()
            t = t.reshape(-1, t.shape[-1])
            part = torch.cat([t.sum(0), (t * t).sum(0), torch.nn.functional.normalize(t, dim=-1).sum(0),
                              torch.tensor([float(t.shape[0])], device=t.device)]).double() * float(counted)
            self.sums[key] = part if key not in self.sums else self.sums[key] + part

    def scale(self, info: D.DistInfo, settings: DistillSettings) -> float:
        total = 0.0
        for key, weight in zip(FEATURES, (settings.pooled_weight, settings.tokens_weight)):
            s = D.all_reduce_sum(self.sums[key], info)
            d = (len(s) - 1) // 3
            n = max(float(s[-1]), 1.0)
            if settings.loss == "cosine":
                value = 1 - float((s[2 * d:3 * d] / n).norm())
            else:
                mean = s[:d] / n
                value = float((s[d:2 * d] / n - mean * mean).clamp_min(0).mean())
            total += weight * value
        return total


@contextlib.contextmanager
def evaluated_weights(model: nn.Module, params: list[nn.Parameter], ema: list[torch.Tensor] | None) -> Iterator[None]:
    """``model`` in eval mode holding the weights the run exports: the EMA's (swapped in, then
    back) when there is one. Train mode after."""
    saved = None
    with torch.no_grad():
        if ema is not None:
            saved = [local_tensor(p).detach().clone() for p in params]
            for p, e in zip(params, ema):
                local_tensor(p).copy_(local_tensor(e))
    model.eval()
    try:
        yield
    finally:
        model.train()
        if saved is not None:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    local_tensor(p).copy_(s)


@dataclass
class Tracker:
    """val_loss over a run: the step-0 value, the best and the latest, and whether to stop.

    Early stopping counts the evaluations (``waited``) since val_loss last fell below
    ``(1 - min_delta)`` times the value that reset the count (``reference``); the best value
    (what ``export best`` keeps) is the lowest one, whatever ``min_delta``."""

    start: float | None = None
    best: float | None = None
    best_step: int | None = None
    last: float | None = None
    last_step: int | None = None
    reference: float | None = None
    waited: int = 0
    stopped: str | None = None  # "early_stop" or "target_val_loss": training ended there

    def update(self, step: int, value: float, settings: DistillSettings, final: bool = False) -> bool:
        """Record the val_loss at ``step``; True when it is the best so far. At the ``final``
        step there is nothing left to stop."""
        finite = math.isfinite(value)
        if step == 0 and self.start is None:
            self.start = value
        self.last, self.last_step = value, step
        improved = finite and (self.best is None or value < self.best)
        if improved:
            self.best, self.best_step = value, step
        if finite and (self.reference is None or value < self.reference * (1 - settings.min_delta)):
            self.reference, self.waited = value, 0
        else:
            self.waited += 1
        if final:
            pass
        elif settings.target_val_loss is not None and finite and value <= settings.target_val_loss:
            self.stopped = "target_val_loss"
        elif settings.early_stop is not None and self.waited >= settings.early_stop:
            self.stopped = "early_stop"
        return improved

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Any, where: str) -> "Tracker":
        """The tracker a checkpoint saved (none in older checkpoints)."""
        if state is None:
            return cls()
        known = {f.name: f for f in fields(cls)}
        if not isinstance(state, dict) or not set(state) <= set(known):
            raise DgmrError(f"{where}: held_out is not a val_loss record")
        for key, value in state.items():
            ok = (isinstance(value, str) if key == "stopped" else
                  isinstance(value, int) if key in ("best_step", "last_step", "waited") else
                  isinstance(value, (int, float)))
            if value is not None and (isinstance(value, bool) or not ok):
                raise DgmrError(f"{where}: held_out.{key} is {value!r}")
        return cls(**state)

    def exported(self, export: str, step: int) -> dict[str, Any]:
        """Which weights the export holds: the best (``export`` best, with held-out images) or
        the last (``step``'s)."""
        if export == "best" and self.best_step is not None:
            return {"weights": "best", "step": self.best_step, "val_loss": self.best}
        why = "export last" if export == "last" else "no held-out images: no val_loss to pick by"
        return {"weights": "last", "step": step, "val_loss": self.last if self.last_step == step else None, "why": why}

    def summary(self) -> dict[str, Any]:
        return {"step0_val_loss": self.start, "best_step": self.best_step, "best_val_loss": self.best,
                "final_val_loss": self.last, "stopped": self.stopped}


class BestWeights:
    """Rank 0's copy, on the CPU, of the trainable parameters and the buffers at the best
    val_loss (whole tensors: gathered under FSDP, a collective every rank joins)."""

    def __init__(self, info: D.DistInfo):
        self.info = info
        self.tensors: dict[str, torch.Tensor] | None = None

    def take(self, trainable: list[tuple[str, nn.Parameter]], model: nn.Module) -> None:
        kept: dict[str, torch.Tensor] = {}
        for name, p in trainable:
            whole = full_tensor(p.detach())
            if self.info.is_main:
                kept[name] = whole.to("cpu", copy=True)
            del whole  # under FSDP every rank held the whole tensor: one at a time
        if self.info.is_main:
            kept.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
            self.tensors = kept

    def resume(self, ckpt: dict[str, Any], tracker: Tracker, trainable: list[tuple[str, nn.Parameter]],
               model: nn.Module) -> None:
        """The best weights a checkpoint saved; None there: the checkpoint's own weights, now
        in ``model``, when they were the best."""
        if ckpt.get("best_weights") is not None:
            self.tensors = ckpt["best_weights"] if self.info.is_main else None
        elif tracker.best_step is not None and tracker.best_step == ckpt["step"]:
            self.take(trainable, model)

    def put_into(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite a full state dict's entries with the best weights."""
        if self.tensors is not None:
            state.update({n: t.to(state[n].dtype) for n, t in self.tensors.items() if n in state})

    def load_into(self, model: nn.Module) -> None:
        """Copy the best weights into an unsharded ``model``."""
        if self.tensors is None:
            return
        named = dict(model.named_parameters())
        named.update(dict(model.named_buffers()))
        with torch.no_grad():
            for n, t in self.tensors.items():
                if n in named:
                    named[n].copy_(t.to(named[n].device))


def progress_postfix(row: dict[str, Any] | None, tracker: Tracker) -> dict[str, str]:
    """The progress bar's fields: the latest training loss, val_loss and the best so far (at
    its step), lr and speed."""
    post = {}
    if row is not None:
        post["loss"] = f"{row['loss']:.4g}"
    if tracker.last is not None:
        post["val"] = f"{tracker.last:.4g}"
        if tracker.best is not None:
            post["best"] = f"{tracker.best:.4g}@{tracker.best_step}"
    if row is not None:
        post.update(lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.1f}")
    return post
