"""The family adapter interface and its registry.

A family says, for the models of one library, where the vision tower and its MLPs live,
how to run it on images, which config fields follow the MLP width, and how to export in
the library's own format. Families are registered with :func:`register_family` and found
with :func:`family_of`, which asks the registered families (a user's first, then the
built-ins) whether they own a model, by ``isinstance``; :class:`GenericFamily` is not a
registry entry: it answers for any model no registered family claims.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...core.errors import DgmrError
from ...core.registry import Registry
from ..sites.attention import AttentionSite, find_attention, shrink_heads
from ..sites.mlp import MlpSite, find_mlps, shrink_mlp
from ..sources import Source
from ..transforms import crop_preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# pooling heads carry MLPs too (timm/EVA attn_pool, SigLIP head, CoCa attn_pool): never pruned
HEAD_EXCLUDE = re.compile(r"(^|\.)(attn_pool|head|pool|text|text_model|transformer_text)(\.|$)")

FAMILIES: Registry[type["Family"]] = Registry("family")
Blocks = list[tuple[str, nn.Module]]  # (path in the model, module) of each sequential block, in forward order


class NoSequentialBlocks(Exception):
    """A family's answer that a model's blocks cannot be run one by one; the message says why
    (calibration then falls back to full forward passes, with that reason in its warning)."""


def register_family(cls: type["Family"] | None = None, *, replace: bool = False, builtin: bool = False):
    """Class decorator (``@register_family`` or ``@register_family(replace=True)``): register
    a :class:`Family` subclass under its ``name``. Families a user registers are asked
    before the built-ins; an existing name is refused unless ``replace=True``."""

    def deco(c: type["Family"]) -> type["Family"]:
        if not (isinstance(c, type) and issubclass(c, Family)):
            raise DgmrError(f"register_family takes a Family subclass, got {c!r}")
        return FAMILIES.add(c.name, c, replace=replace, builtin=builtin)

    return deco(cls) if cls is not None else deco


def family_of(model: nn.Module) -> "Family":
    """The adapter of the first registered family that owns ``model``, else the generic one."""
    for cls in FAMILIES.values():
        if cls.detect(model):
            return cls()
    return GenericFamily()


def get_family(name: str) -> "Family":
    """The family recorded under ``name`` in a dgmr directory."""
    if name == GenericFamily.name and name not in FAMILIES:
        return GenericFamily()
    return FAMILIES.get_or_fail(name)()


def loaded_module(name: str) -> Any:
    """The library module ``name`` if something already imported it, else None: a model of
    that library cannot exist without it, so detection never pays for an import."""
    return sys.modules.get(name)


def ratio_for(d: int, target: int) -> float:
    """The smallest float r with int(d * r) == target (libraries compute widths that way)."""
    r = target / d
    while int(d * r) < target:
        r = math.nextafter(r, math.inf)
    return r


def _ratio_candidates(d: int, k: int) -> Iterable[float]:
    """mlp_ratio values that may give width k: r*d = k (plain, split SwiGLU), 2k (packed GLU),
    or about 1.5k (HF Dinov2 SwiGLU keeps 2/3 of int(d*r), rounded up to a multiple of 8)."""
    seen: set[float] = set()
    for t in [k, 2 * k, *range(max(1, (3 * k) // 2 - 12), (3 * k) // 2 + 13)]:
        # some configs type mlp_ratio as int (transformers 5 Dinov2Config): try the int first
        for r in ([t // d] if t % d == 0 else []) + [ratio_for(d, t)]:
            if r not in seen:
                seen.add(r)
                yield r


def site_widths(sites: list[MlpSite]) -> list[int]:
    return [s.hidden for s in sites]


class Family:
    """Base adapter; the generic family works for any nn.Module with recognisable MLPs."""

    name = "generic"
    library: str | None = None

    @classmethod
    def classes(cls) -> tuple[type, ...]:
        """The model classes this family owns (their subclasses too); () owns nothing."""
        return ()

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.classes())

    # -- structure ---------------------------------------------------------------------
    def vision_root(self, model: nn.Module) -> tuple[str, nn.Module]:
        """(path prefix, module) of the image tower: what is pruned, counted and timed."""
        return "", model

    exclude: re.Pattern = HEAD_EXCLUDE

    def mlps(self, model: nn.Module) -> list[MlpSite]:
        prefix, root = self.vision_root(model)
        return find_mlps(root, exclude=self.exclude, prefix=prefix)

    # attention in pooling heads (attn_pool, MAP heads) is never cut: the same exclusion as the MLPs'
    attention_exclude: re.Pattern = HEAD_EXCLUDE

    def attention(self, model: nn.Module) -> list[AttentionSite]:
        """The vision tower's attention layers whose heads can be cut ([] when none is recognised)."""
        prefix, root = self.vision_root(model)
        return find_attention(root, exclude=self.attention_exclude, prefix=prefix)

    def vision_params(self, model: nn.Module) -> int:
        """Parameters of the image tower (what dgmr reports before/after pruning)."""
        return sum(p.numel() for p in self.vision_root(model)[1].parameters())

    def image_forward(self, model: nn.Module, x: torch.Tensor) -> Any:
        """Run the vision tower on a batch of images (B, 3, H, W)."""
        return self.vision_root(model)[1](x)

    def image_size(self, model: nn.Module) -> int:
        return 224

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """Input size and normalisation the model was trained with:
        {"image_size": int, "mean": (r, g, b), "std": (r, g, b)}."""
        return {"image_size": self.image_size(model), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def eval_preprocess(self, model: nn.Module, src: Source | None = None, image_size: int | None = None) -> Any:
        """The model's own evaluation transform as an
        :class:`~dgmr.models.preprocess.EvalPreprocess`; call it through
        :func:`dgmr.models.preprocess.resolve_eval_preprocess`. Families without library
        preprocessing: resize to size/0.875, center crop, :meth:`data_config`'s mean/std."""
        dc = self.data_config(model)
        return crop_preprocess(int(image_size or dc["image_size"]), dc["mean"], dc["std"])

    def saved_preprocess(self, model: nn.Module, saved: dict[str, Any], directory: Path | None,
                         image_size: int | None = None) -> Any:
        """The eval transform a dgmr directory saved (``saved``: the settings of
        :meth:`eval_preprocess` at save time; ``directory``: where the library's own
        preprocessing files are), at ``image_size`` if given. Families without library
        preprocessing saved a resize + center crop."""
        try:
            crop = int(image_size or saved["crop"])
            return crop_preprocess(crop, saved["mean"], saved["std"], float(saved["crop"]) / float(saved["resize"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a family's own settings: its own transform
            return self.eval_preprocess(model, None, image_size)

    def card_info(self, model: nn.Module, src: Source | None, random_init: bool = False) -> dict[str, Any]:
        """The model card's ``library_name``, ``pipeline_tag``, ``base_model`` (a Hub repo id the
        source names, not for random weights) and ``license`` (the source's, where known)."""
        return {"library_name": "dgmr", "pipeline_tag": "image-feature-extraction", "base_model": None, "license": None}

    def features(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final-layer features for distillation and evaluation:
        {"pooled": (B, D) CLS/pooled feature, "tokens": (B, N, D) patch tokens}."""
        out = self.image_forward(model, x)
        if out.ndim == 3:
            return {"pooled": out[:, 0], "tokens": out[:, 1:]}
        return {"pooled": out.flatten(1), "tokens": out.flatten(1)[:, None]}

    # -- calibration (dgmr.prune.calibration.sweep) -------------------------------------------
    def sequential_blocks(self, model: nn.Module) -> Blocks:
        """The vision tower's sequential blocks, in forward order: modules the forward calls
        once each, one after the other, each on the hidden state the one before returned (its
        first positional argument; a tuple's first element), every other argument (rope,
        masks, position embeddings) the same whatever the blocks did. Calibration catches the
        first block's inputs once and then runs the blocks one at a time; it checks all of the
        above on its first pass and falls back to full passes if the forward disagrees.

        Raise :class:`NoSequentialBlocks` (saying why) for a model whose blocks cannot be
        run so. The default takes the ModuleList or Sequential whose children, modules with a
        forward of their own, hold the most MLPs."""
        prefix, root = self.vision_root(model)
        return blocks_holding(root, self.mlps(model), prefix)

    # -- config + export ----------------------------------------------------------------
    def update_config(self, model: nn.Module, src: Source | None) -> dict[str, Any]:
        """Make the model's own config agree with its MLP widths; returns what changed."""
        return {}

    def export_native(self, model: nn.Module, out: Path, src: Source | None) -> dict[str, Any]:
        """Write the source library's own files beside ``out/model.safetensors`` (the weights,
        already there: stored once), so that ``out`` is a model repository of that library;
        returns a note ({"format", "files", "load"} or {"skipped": why the library's loader
        cannot rebuild this model}). A place for what a library's config can say beyond MLP
        widths (e.g. a head dimension) is the note's config fields, written here too."""
        return {"skipped": "no native format for generic models; use dgmr.load"}

    # -- streaming prune (dgmr.prune.stream) -------------------------------------------------
    def stream_layout(self, shaped: nn.Module, *, tower_only: bool, native: bool, sharded: bool) -> str:
        """Where a streaming prune writes the weights of ``shaped`` (the pruned model on meta):
        ``file`` (one ``model.safetensors``, written as tensors come: timm's and open_clip's
        loaders read one file) or ``shards`` (HF-style shards at the top, beside transformers'
        config.json for :class:`~dgmr.models.families.hf.HFFamily`)."""
        return "shards" if sharded else "file"

    def export_streamed(self, meta: nn.Module, out: Path, src: Source, layout: str,
                        tower_only: str | None) -> dict[str, Any]:
        """The native export of a streamed prune, written from the meta model (no weights);
        ``tower_only`` names the tower when the checkpoint held only that."""
        if tower_only is not None:
            return {"skipped": f"the checkpoint holds only {tower_only!r}: dgmr.load returns that tower"}
        if layout != "file":
            return {"skipped": "sharded output (--shard-size): timm/open_clip loaders read one file; use dgmr.load"}
        return self.export_native(meta, out, src)


def _has_forward(m: nn.Module) -> bool:
    return type(m).forward is not nn.Module.forward


def blocks_holding(root: nn.Module, sites: list[MlpSite], prefix: str = "") -> Blocks:
    """The children of the ModuleList/Sequential under ``root`` that hold the most of
    ``sites`` (ties: the one with more children, the finer split), as :meth:`Family.sequential_blocks`
    returns them; :class:`NoSequentialBlocks` if no container's children can be called."""
    owner = {id(s.module): s.name for s in sites}
    best: tuple[int, int, str, nn.Module] | None = None
    for path, m in root.named_modules(prefix=prefix):
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or not len(m):
            continue
        held = sum(1 for child in m for sub in child.modules() if id(sub) in owner)
        if held and (best is None or (held, len(m)) > best[:2]):
            best = (held, len(m), path, m)
    if best is None:
        raise NoSequentialBlocks(f"no ModuleList or Sequential under {type(root).__name__} holds its MLPs")
    _, _, path, container = best
    lost = [type(c).__name__ for c in container if not _has_forward(c)]
    if lost:
        raise NoSequentialBlocks(f"the children of {path or type(root).__name__} ({lost[0]}) have no forward of "
                                 "their own: the model's forward runs what is inside them")
    return [(f"{path}.{i}" if path else str(i), child) for i, child in enumerate(container)]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def uniform_ratio(model: nn.Module, build: Callable[[float], nn.Module], family: "Family") -> float | None:
    """An mlp_ratio whose architecture (built on meta) has exactly ``model``'s tensor shapes.

    All shapes are compared, not only the pruned MLPs' widths: a library may size another
    MLP from the same ratio (timm's attention-pooling head), and such a config would not
    load the pruned weights."""
    sites = family.mlps(model)
    d, k = sites[0].in_features, sites[0].hidden
    if any(s.hidden * d != k * s.in_features for s in sites):
        return None
    want = _shapes(model)
    for r in _ratio_candidates(d, k):
        try:
            built = build(r)
        except Exception:  # a ratio the library rejects is simply not a candidate
            continue
        if _shapes(built) == want:
            return r
    return None


class GenericFamily(Family):
    """Any nn.Module with recognisable MLPs: the fallback after every registered family."""

    name = "generic"

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return True


def apply_widths(model: nn.Module, widths: dict[str, int], family: Family | None = None) -> None:
    """Shape-only surgery: give each named MLP its recorded width (keeps the first k neurons;
    used to rebuild an architecture before loading pruned weights)."""
    family = family or family_of(model)
    sites = {s.name: s for s in family.mlps(model)}
    missing = set(widths) - set(sites)
    if missing:
        raise DgmrError(f"the model has no MLP named {sorted(missing)[0]!r} (has {len(sites)} MLPs)")
    for name, k in widths.items():
        if k != sites[name].hidden:
            shrink_mlp(sites[name], torch.arange(k))


def apply_heads(model: nn.Module, heads: dict[str, int], family: Family | None = None) -> None:
    """Shape-only surgery: give each named attention layer its recorded head count (keeps the
    first k heads; used to rebuild an architecture before loading head-pruned weights)."""
    family = family or family_of(model)
    sites = {s.name: s for s in family.attention(model)}
    missing = set(heads) - set(sites)
    if missing:
        raise DgmrError(f"the model has no attention layer named {sorted(missing)[0]!r} (has {len(sites)})")
    for name, k in heads.items():
        if k != sites[name].heads:
            shrink_heads(sites[name], torch.arange(k))
