"""Per-family adapters: where the vision tower and its MLPs live, how to run it on images,
which config fields follow the MLP width, and how to export in the library's own format.

Families are registered with :func:`register_family` and looked up with
:func:`family_of`, which asks each registered family (in order) whether it owns a model.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import DgmrError
from .mlp import MlpSite, find_mlps, shrink_mlp
from .sources import Source, build_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# pooling heads carry MLPs too (timm/EVA attn_pool, SigLIP head, CoCa attn_pool): never pruned
HEAD_EXCLUDE = re.compile(r"(^|\.)(attn_pool|head|pool|text|text_model|transformer_text)(\.|$)")

FAMILIES: dict[str, type["Family"]] = {}


def register_family(cls: type["Family"]) -> type["Family"]:
    FAMILIES[cls.name] = cls
    return cls


def family_of(model: nn.Module) -> "Family":
    for cls in FAMILIES.values():
        if cls.detect(model):
            return cls()
    raise DgmrError(f"no family adapter for {type(model).__name__}")  # unreachable: generic matches all


def get_family(name: str) -> "Family":
    try:
        return FAMILIES[name]()
    except KeyError:
        raise DgmrError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


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


def _is_eva(model: nn.Module) -> bool:
    """timm's EVA / EVA02 towers (also the trunks of open_clip's EVA-CLIP models)."""
    return type(model).__name__ == "Eva" and type(model).__module__.startswith("timm.") and hasattr(model, "blocks")


def _final_block_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the last transformer block (before the final norm) of a timm ViT-like model."""
    seen: list[torch.Tensor] = []
    handle = model.blocks[-1].register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    return seen[-1]


class Family:
    """Base adapter; the generic family works for any nn.Module with recognisable MLPs."""

    name = "generic"
    library: str | None = None

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return True

    # -- structure ---------------------------------------------------------------------
    def vision_root(self, model: nn.Module) -> tuple[str, nn.Module]:
        """(path prefix, module) of the image tower: what is pruned, counted and timed."""
        return "", model

    exclude: re.Pattern = HEAD_EXCLUDE

    def mlps(self, model: nn.Module) -> list[MlpSite]:
        prefix, root = self.vision_root(model)
        return find_mlps(root, exclude=self.exclude, prefix=prefix)

    def image_forward(self, model: nn.Module, x: torch.Tensor) -> Any:
        """Run the vision tower on a batch of images (B, 3, H, W)."""
        return self.vision_root(model)[1](x)

    def image_size(self, model: nn.Module) -> int:
        return 224

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """Input size and normalisation the model was trained with:
        {"image_size": int, "mean": (r, g, b), "std": (r, g, b)}."""
        return {"image_size": self.image_size(model), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def features(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final-layer features for distillation and evaluation:
        {"pooled": (B, D) CLS/pooled feature, "tokens": (B, N, D) patch tokens}."""
        out = self.image_forward(model, x)
        if out.ndim == 3:
            return {"pooled": out[:, 0], "tokens": out[:, 1:]}
        return {"pooled": out.flatten(1), "tokens": out.flatten(1)[:, None]}

    # -- config + export ----------------------------------------------------------------
    def update_config(self, model: nn.Module, src: Source | None) -> dict[str, Any]:
        """Make the model's own config agree with its MLP widths; returns what changed."""
        return {}

    def export_native(self, model: nn.Module, out: Path, src: Source | None) -> dict[str, Any]:
        """Write the source library's own loadable format under ``out``; returns a note
        ({"format", "files", "load"} or {"skipped": reason})."""
        return {"skipped": "no native format for generic models; use dgmr.load"}


def _uniform_ratio(sites: list[MlpSite], build: Callable[[float], nn.Module], family: "Family") -> float | None:
    """An mlp_ratio whose architecture (built on meta) has exactly these MLP widths."""
    target = site_widths(sites)
    d, k = sites[0].in_features, sites[0].hidden
    if any(s.hidden * d != k * s.in_features for s in sites):
        return None
    for r in _ratio_candidates(d, k):
        try:
            built = build(r)
        except Exception:  # a ratio the library rejects is simply not a candidate
            continue
        if site_widths(family.mlps(built)) == target:
            return r
    return None


@register_family
class OpenClipFamily(Family):
    name = "open_clip"
    library = "open_clip"

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.") and hasattr(model, "visual")

    def vision_root(self, model):
        return "visual", model.visual

    def image_forward(self, model, x):
        return model.encode_image(x)

    def image_size(self, model):
        s = getattr(model.visual, "image_size", 224)
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    def data_config(self, model):
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        mean = tuple(pp.get("mean") or getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        std = tuple(pp.get("std") or getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD)
        return {"image_size": self.image_size(model), "mean": mean, "std": std}

    def features(self, model, x):
        visual = model.visual
        if self._is_timm_tower(model):
            trunk = visual.trunk
            prefix = getattr(trunk, "num_prefix_tokens", 1)
            if _is_eva(trunk):  # EVA-CLIP recipe: final-block tokens, final norm and head removed
                tokens = _final_block_tokens(trunk, x)
                return {"pooled": tokens[:, 0], "tokens": tokens[:, prefix:]}
            tokens = trunk.forward_features(x)  # one trunk pass: pooled = head(pool(tokens)), as visual(x)
            return {"pooled": visual.head(trunk.forward_head(tokens)), "tokens": tokens[:, prefix:]}
        old = getattr(visual, "output_tokens", False)
        visual.output_tokens = True
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = old
        return {"pooled": pooled, "tokens": tokens}

    @staticmethod
    def _is_timm_tower(model) -> bool:
        return hasattr(model.visual, "trunk")

    def export_trunk(self, model, out: Path, src: Source, separate_weights: bool) -> dict[str, Any]:
        """open_clip's timm towers take no MLP width in their JSON: export the trunk for timm,
        built the way open_clip's TimmModel builds it, in ``out/timm_trunk``. Its weights are
        a copy of the trunk's (``separate_weights``), or ``out/model.safetensors`` itself:
        timm's ViT and EVA checkpoint filters strip open_clip's ``visual.trunk.`` prefix."""
        vc = src.model_cfg["vision_cfg"]
        pool, proj = vc.get("timm_pool", "avg"), vc.get("timm_proj", "linear")
        trunk = model.visual.trunk
        if proj in ("linear", "mlp") or pool in ("abs_attn", "rot_attn"):
            kwargs = {"num_classes": 0}
            reset = {"num_classes": 0, "global_pool": "" if pool in ("abs_attn", "rot_attn") else pool} if pool else None
        else:
            kwargs, reset = {"num_classes": trunk.num_classes, "global_pool": pool}, None
        note = TimmFamily()._export_timm(trunk, out / "timm_trunk", Source("timm", vc["timm_model_name"], kwargs=kwargs),
                                         separate_weights=separate_weights, reset=reset,
                                         weights=None if separate_weights else "model.safetensors")
        if "skipped" not in note:
            note["load"] += ("; then m = open_clip.create_model(ARCH) and m.visual.trunk = that trunk; "
                             "visual.head weights are in DIR/model.safetensors (or use dgmr.load(DIR))")
        return note

    def export_native(self, model, out, src):
        if src is None or src.model_cfg is None:
            return {"skipped": "no open_clip model config recorded"}
        sites = self.mlps(model)
        if self._is_timm_tower(model):
            return self.export_trunk(model, out, src, separate_weights=True)

        def build(r: float):
            cfg = json.loads(json.dumps(src.model_cfg))
            cfg["vision_cfg"]["mlp_ratio"] = r
            digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
            return build_model(Source("open_clip", f"dgmr-verify-{digest}", model_cfg=cfg), meta=True)

        r = _uniform_ratio(sites, build, self)
        if r is None:
            return {"skipped": "per-layer MLP widths differ; open_clip configs hold one mlp_ratio"}
        cfg = json.loads(json.dumps(src.model_cfg))
        cfg["vision_cfg"]["mlp_ratio"] = r
        preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
        return {"format": "open_clip local-dir", "files": ["open_clip_config.json", "model.safetensors"],
                "load": "open_clip.create_model('local-dir:DIR')"}


@register_family
class HFFamily(Family):
    name = "hf"
    library = "hf"

    @classmethod
    def detect(cls, model):
        return type(model).__module__.startswith("transformers.") and hasattr(model, "config")

    # transformers builds SigLIP's pooling-head MLP from the same intermediate_size as the blocks,
    # so it is pruned with them: otherwise no config could describe the pruned model
    exclude = re.compile(r"(^|\.)(text_model|text)(\.|$)")

    def vision_root(self, model):
        if hasattr(model, "vision_model"):
            return "vision_model", model.vision_model
        return "", model

    @staticmethod
    def _vision_config(config):
        return getattr(config, "vision_config", None) or config

    def image_forward(self, model, x):
        prefix, root = self.vision_root(model)
        return root(pixel_values=x)

    def image_size(self, model):
        return int(getattr(self._vision_config(model.config), "image_size", 224))

    def data_config(self, model):
        mt = getattr(model.config, "model_type", "")
        if mt in ("clip", "clip_vision_model"):
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        elif mt.startswith(("siglip", "vit")) and not mt.startswith("vit_mae"):
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        return {"image_size": self.image_size(model), "mean": mean, "std": std}

    def features(self, model, x):
        out = self.image_forward(model, x)
        tokens = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        prefix = 1 if tokens.shape[1] > 1 and getattr(model.config, "model_type", "").startswith(("vit", "clip", "dinov2")) else 0
        if pooled is None:
            pooled = tokens[:, 0] if prefix else tokens.mean(1)
        return {"pooled": pooled, "tokens": tokens[:, prefix:]}

    def _width_fields(self, model, sites) -> tuple[dict[str, Any] | None, str]:
        """(config fields that rebuild these widths, or None with the reason why none do)."""
        import transformers

        vc = self._vision_config(model.config)
        widths = site_widths(sites)
        name = type(vc).__name__
        if len(set(widths)) != 1:
            return None, f"per-layer MLP widths differ ({min(widths)}..{max(widths)}); {name} holds one width"
        if hasattr(vc, "intermediate_size"):
            return {"intermediate_size": widths[0]}, ""
        if hasattr(vc, "mlp_ratio"):
            cls = type(model)

            def build(r: float):
                cfg = model.config.__class__.from_dict(model.config.to_dict())
                setattr(self._vision_config(cfg), "mlp_ratio", r)
                with torch.device("meta"):
                    return cls._from_config(cfg) if hasattr(cls, "_from_config") else transformers.AutoModel.from_config(cfg)

            r = _uniform_ratio(sites, build, self)
            if r is None:
                return None, (f"no {name}.mlp_ratio (of type {type(vc.mlp_ratio).__name__}) builds hidden width "
                              f"{widths[0]} for embed dim {sites[0].in_features}; pick another width")
            return {"mlp_ratio": r}, ""
        return None, f"{name} has no intermediate_size or mlp_ratio field"

    def update_config(self, model, src):
        fields, _ = self._width_fields(model, self.mlps(model))
        if fields is None:
            return {}
        vc = self._vision_config(model.config)
        for k, v in fields.items():
            setattr(vc, k, v)
        return fields

    def export_native(self, model, out, src):
        fields, why = self._width_fields(model, self.mlps(model))
        if fields is None:
            return {"skipped": why}
        self.update_config(model, src)
        model.save_pretrained(out / "hf", safe_serialization=True)
        return {"format": "transformers save_pretrained", "files": ["hf/"],
                "load": f"transformers.{type(model).__name__}.from_pretrained('DIR/hf')"}


@register_family
class TimmFamily(Family):
    name = "timm"
    library = "timm"

    @classmethod
    def detect(cls, model):
        return type(model).__module__.startswith("timm.")

    def image_size(self, model):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        return int(img[0]) if img else int(size[-1])

    def data_config(self, model):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        return {"image_size": self.image_size(model), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}

    def features(self, model, x):
        if _is_eva(model):  # EVA-CLIP recipe: final-block tokens, final norm and head removed
            tokens = _final_block_tokens(model, x)
            return {"pooled": tokens[:, 0], "tokens": tokens[:, getattr(model, "num_prefix_tokens", 1):]}
        tokens = model.forward_features(x)
        if tokens.ndim == 4:  # Swin & co: (B, H, W, C)
            tokens = tokens.flatten(1, 2)
            return {"pooled": tokens.mean(1), "tokens": tokens}
        prefix = getattr(model, "num_prefix_tokens", 0)
        pooled = model.forward_head(tokens, pre_logits=True)
        return {"pooled": pooled, "tokens": tokens[:, prefix:]}

    def _export_timm(self, model, out: Path, src: Source, separate_weights: bool = False,
                     reset: dict[str, Any] | None = None, weights: str | None = None) -> dict[str, Any]:
        """timm's convention: ``timm_config.json`` (name + create_model kwargs incl. mlp_ratio) beside
        a state dict that ``pretrained_cfg_overlay=dict(file=...)`` loads; ``separate_weights`` writes
        the state dict of ``model`` (a sub-module, e.g. an open_clip trunk) into ``out`` too;
        ``weights`` names the file to load instead, relative to the dgmr directory."""
        import timm

        sites = self.mlps(model)

        def build(r: float):
            with torch.device("meta"):
                return timm.create_model(src.name, pretrained=False, **{**src.kwargs, "mlp_ratio": r})

        r = _uniform_ratio(sites, build, self)
        if r is None:
            return {"skipped": "per-layer MLP widths are not one timm mlp_ratio"}
        out.mkdir(parents=True, exist_ok=True)
        kwargs = {**src.kwargs, "mlp_ratio": r}
        files = ["timm_config.json"]
        if separate_weights:
            from safetensors.torch import save_file

            sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
            files.append("model.safetensors")
        (out / "timm_config.json").write_text(json.dumps(
            {"model_name": src.name, "kwargs": kwargs, **({"reset_classifier": reset} if reset else {})}, indent=2))
        where = f"DIR/{weights}" if weights else "DIR/timm_trunk/model.safetensors" if separate_weights else "DIR/model.safetensors"
        load = (f"timm.create_model({src.name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='{where}'), "
                + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
        if reset:
            load += ".reset_classifier(" + ", ".join(f"{k}={v!r}" for k, v in reset.items()) + ")"
        return {"format": "timm pretrained_cfg_overlay", "files": files, "mlp_ratio": r, "load": load,
                "weights": where.removeprefix("DIR/")}

    def export_native(self, model, out, src):
        if src is None:
            return {"skipped": "no timm model name recorded"}
        return self._export_timm(model, out, src)


@register_family
class GenericFamily(Family):
    name = "generic"


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
