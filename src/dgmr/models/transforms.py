"""An evaluation transform and the settings that define it (:class:`EvalPreprocess`), and
the classic resize + center crop (:func:`crop_preprocess`). The families build their models'
own transforms on these; :mod:`.preprocess` picks the one a model gets."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..core.errors import DgmrError

CROP_PCT = 224 / 256


Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class EvalPreprocess:
    """A transform and the settings that define it (JSON-able: part of the feature-cache key
    and of the result files)."""

    transform: Transform = field(repr=False)
    settings: dict[str, Any]

    def __post_init__(self) -> None:
        # as JSON holds them (tuples as lists, enums as text), whatever form a family gives
        object.__setattr__(self, "settings", json.loads(json.dumps(self.settings, default=str)))

    def describe(self) -> str:
        return json.dumps(self.settings, sort_keys=True, default=str)


def _floats(xs: Sequence[float]) -> list[float]:
    return [round(float(x), 8) for x in xs]


def crop_preprocess(image_size: int, mean: Sequence[float], std: Sequence[float],
                    crop_pct: float = CROP_PCT) -> EvalPreprocess:
    """Resize the short side to ``image_size / crop_pct`` (bicubic), center-crop
    ``image_size``, scale to [0, 1] and normalise with ``mean``/``std``."""
    from torchvision import transforms as T

    if not image_size or int(image_size) <= 0:
        raise DgmrError(f"image size must be a positive integer, got {image_size}")
    if not 0 < float(crop_pct) <= 1:
        raise DgmrError(f"crop fraction must be in (0, 1], got {crop_pct}")
    resize = int(round(int(image_size) / float(crop_pct)))
    tf = T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(int(image_size)),
        T.ToTensor(),
        T.Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std)),
    ])
    settings = {"library": "dgmr", "resize": resize, "crop": int(image_size), "interp": "bicubic",
                "mean": _floats(mean), "std": _floats(std)}
    return EvalPreprocess(tf, settings)


def crop_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = CROP_PCT) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``image_size / crop_pct`` (256 for 224), center-crop
    ``image_size``, scale to [0, 1] and normalise with ``mean``/``std``: the transform of
    :func:`crop_preprocess` (the evaluations use the model's own transform,
    :func:`dgmr.models.preprocess.eval_transform`, unless a crop fraction is asked for)."""
    return crop_preprocess(image_size, mean, std, crop_pct).transform
