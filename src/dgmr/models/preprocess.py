"""The one place that builds a model's evaluation transform (PIL image -> normalised tensor).

By default every family evaluates with the preprocessing its library ships for the model
(the numbers then match what the library's own tools, e.g. clip_benchmark, report):

* open_clip: ``open_clip.image_transform_v2`` from the full preprocess config (size, mean,
  std, interpolation, resize_mode, fill colour) of the pretrained tag, read from open_clip's
  offline tag metadata, so a ``--random-init`` model or a dgmr directory preprocesses like
  the published checkpoint;
* timm: ``timm.data.resolve_data_config`` + ``timm.data.create_transform``;
* Hugging Face: the model's image processor (a locally cached one, else the processor class
  of the model type with its defaults, resized to the model's input size);
* anything else: resize to size/0.875, center crop, the family's mean/std.

A dgmr directory carries its model's preprocessing (its record's ``preprocess``, and the
library's own files: timm's pretrained config, open_clip's preprocess config, the HF image
processor), and is evaluated with that, never with files at the original source's path.

``crop=0.875`` (or any fraction) asks for that classic resize + center crop instead, in the
model's own normalisation (the kNN / linear-probe convention of DINO-style papers).
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import DgmrError
from .families import family_of
from .transforms import CROP_PCT, EvalPreprocess, Transform, crop_preprocess

__all__ = ["CROP_PCT", "EvalPreprocess", "Transform", "crop_preprocess", "eval_transform", "resolve_eval_preprocess"]


def resolve_eval_preprocess(model: torch.nn.Module, family: Any = None, *, source: Any = None,
                            crop: float | None = None, image_size: int | None = None,
                            saved: tuple[dict[str, Any], Any] | None = None) -> EvalPreprocess:
    """The evaluation preprocessing of ``model`` (see the module docstring). ``source``: the
    :class:`~dgmr.models.sources.Source` it was built from (open_clip's pretrained tag lives
    there); ``image_size`` overrides the model's input size; ``saved``: (settings, directory)
    of the preprocessing a dgmr directory saved, used instead of the source's."""
    family = family or family_of(model)
    if image_size is not None and int(image_size) <= 0:
        raise DgmrError(f"image size must be a positive integer, got {image_size}")
    if saved is not None:
        own = family.saved_preprocess(model, saved[0], saved[1], image_size)
    else:
        own = family.eval_preprocess(model, source, image_size)
    if crop is None:
        return own
    # the fixed crop in the model's own normalisation: the library's (an open_clip tag's
    # mean/std are not on a model built without the tag), else the family's
    dc = family.data_config(model)
    mean = own.settings.get("mean") or own.settings.get("image_mean") or dc["mean"]
    std = own.settings.get("std") or own.settings.get("image_std") or dc["std"]
    return crop_preprocess(int(image_size or dc["image_size"]), mean, std, crop)


def eval_transform(model: torch.nn.Module, family: Any = None, *, source: Any = None, crop: float | None = None,
                   image_size: int | None = None) -> Transform:
    """``resolve_eval_preprocess(...).transform``: the callable to give a dataset."""
    return resolve_eval_preprocess(model, family, source=source, crop=crop, image_size=image_size).transform
