"""Hugging Face transformers models: ViT, CLIP (vision tower), DINOv2 (plain and SwiGLU), SigLIP.

Exported as a ``from_pretrained`` folder: config.json (its ``intermediate_size`` or
``mlp_ratio`` set to the pruned width where one value can describe it, and
``num_attention_heads``/``head_dim`` where cut heads can be said), the image processor and
model.safetensors, all at the top of the dgmr directory.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from ..transforms import EvalPreprocess
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Family,
    loaded_module,
    register_family,
    site_widths,
    uniform_ratio,
)


@register_family(builtin=True)
class HFFamily(Family):
    name = "hf"
    library = "hf"

    @classmethod
    def classes(cls):
        tr = loaded_module("transformers")
        return (tr.PreTrainedModel,) if tr is not None else ()

    # transformers builds SigLIP's pooling-head MLP from the same intermediate_size as the blocks,
    # so it is pruned with them: otherwise no config could describe the pruned model
    exclude = re.compile(r"(^|\.)(text_model|text)(\.|$)")
    # ...but its attention is the pooling head's own (nn.MultiheadAttention): never cut
    attention_exclude = re.compile(r"(^|\.)(text_model|text|head)(\.|$)")

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

    def eval_preprocess(self, model, src=None, image_size=None):
        proc = _image_processor(model, src)
        if proc is None:  # a model type without an image processor: the generic transform
            return super().eval_preprocess(model, src, int(image_size or self.image_size(model)))
        return self.processor_preprocess(model, proc, image_size)

    def processor_preprocess(self, model, proc, image_size=None):
        """An image processor as the model's eval transform, at ``image_size`` (default: the model's)."""
        size = int(image_size or self.image_size(model))
        # DINOv2 interpolates its position embeddings to any input: its config's 518 px is the
        # training size, the published processor's 224 crop is how it is evaluated
        any_size = str(getattr(model.config, "model_type", "")) in _ANY_SIZE and image_size is None
        kwargs = {} if any_size else _resized(proc, size)
        transform = _ProcessorTransform(proc, kwargs)
        # every processor setting (crop_pct, ...) keys the feature cache, not a chosen few
        d = {k: v for k, v in proc.to_dict().items() if not k.startswith("_")}
        return EvalPreprocess(transform, {"library": "hf", "processor": type(proc).__name__, **d, **kwargs})

    def features(self, model, x):
        out = self.image_forward(model, x)
        tokens = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        prefix = 1 if tokens.shape[1] > 1 and getattr(model.config, "model_type", "").startswith(("vit", "clip", "dinov2")) else 0
        if pooled is None:
            pooled = tokens[:, 0] if prefix else tokens.mean(1)
        return {"pooled": pooled, "tokens": tokens[:, prefix:]}

    def sequential_blocks(self, model):
        # the encoder layers (ViT, CLIP, SigLIP, DINOv2; transformers 5's ViT holds them at the
        # root); SigLIP's pooling-head MLP runs after them and is calibrated with a full pass
        prefix, root = self.vision_root(model)
        at = f"{prefix}." if prefix else ""
        for path in ("encoder.layers", "encoder.layer", "layers", "layer"):
            layers = root.get_submodule(path) if _has_submodule(root, path) else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers):
                return [(f"{at}{path}.{i}", m) for i, m in enumerate(layers)]
        return super().sequential_blocks(model)

    def width_fields(self, model, sites, heads: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str]:
        """(config fields that rebuild these widths, or None with the reason why none do);
        ``heads``: the head fields the config will hold too (:meth:`head_fields`)."""
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
                for k, v in {**(heads or {}), "mlp_ratio": r}.items():
                    setattr(self._vision_config(cfg), k, v)
                with torch.device("meta"):
                    return cls._from_config(cfg) if hasattr(cls, "_from_config") else transformers.AutoModel.from_config(cfg)

            r = uniform_ratio(model, build, self)
            if r is None:
                return None, (f"no {name}.mlp_ratio (of type {type(vc.mlp_ratio).__name__}) builds hidden width "
                              f"{widths[0]} for embed dim {sites[0].in_features}; pick another width")
            return {"mlp_ratio": r}, ""
        return None, f"{name} has no intermediate_size or mlp_ratio field"

    def head_fields(self, model) -> tuple[dict[str, Any] | None, str]:
        """(config fields that rebuild the attention layers' head counts at their head dim, or
        None with the reason why none do); {} when no head was cut. Checked by building the
        attention from the config on meta: only some classes read a ``head_dim`` field."""
        vc = self._vision_config(model.config)
        sites = self.attention(model)
        heads = getattr(vc, "num_attention_heads", None)
        if all(s.heads == heads for s in sites):
            return {}, ""
        name = type(vc).__name__
        if len({(s.heads, s.head_dim) for s in sites}) != 1:
            return None, f"per-layer attention head counts differ; {name} holds one num_attention_heads"
        fields = {"num_attention_heads": sites[0].heads, "head_dim": sites[0].head_dim}
        cfg = model.config.__class__.from_dict(model.config.to_dict())
        for k, v in fields.items():
            setattr(self._vision_config(cfg), k, v)
        with torch.device("meta"):
            built = type(model)._from_config(cfg)
        want = {s.name: [tuple(t.shape) for t in s.module.state_dict().values()] for s in sites}
        got = {s.name: [tuple(t.shape) for t in s.module.state_dict().values()] for s in self.attention(built)}
        if got != want:
            return None, (f"{name} derives the head dim from hidden_size / num_attention_heads: no config keeps "
                          f"{sites[0].heads} heads of {sites[0].head_dim} channels")
        return fields, ""

    def native_fields(self, model) -> tuple[dict[str, Any] | None, str]:
        """The config fields of :meth:`width_fields` and :meth:`head_fields` together, or None and why not."""
        heads, why = self.head_fields(model)
        if heads is None:
            return None, why
        fields, why = self.width_fields(model, self.mlps(model), heads)
        return (None, why) if fields is None else ({**fields, **heads}, "")

    def update_config(self, model, src):
        # what the config can say, even where the rest it cannot (CLIP's widths beside cut heads)
        heads, _ = self.head_fields(model)
        widths, _ = self.width_fields(model, self.mlps(model), heads)
        fields = {**(widths or {}), **(heads or {})}
        vc = self._vision_config(model.config)
        for k, v in fields.items():
            setattr(vc, k, v)
        return fields

    def hub_files(self, model, out, src, *, weights: bool) -> dict[str, Any]:
        """What ``save_pretrained`` would put beside the weights: config.json (when one config
        can describe the widths), the image processor (preprocessor_config.json, at the model's
        input size) and, for CLIP-style models, a tokenizer the source folder has."""
        files = []
        proc = _image_processor(model, src)
        if proc is not None:
            _sized_processor(model, proc).save_pretrained(out)
            files.append("preprocessor_config.json")
        if hasattr(model, "get_text_features") and src is not None and Path(src.name).is_dir():
            files += _copy_tokenizer(src.name, out)
        fields, why = self.native_fields(model)
        if fields is None:
            return {"skipped": why, "files": files}
        self.update_config(model, src)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(out)
        weights = ["model.safetensors"] if weights else []
        return {"format": "transformers (from_pretrained / hub)", "files": ["config.json", *weights, *files],
                "load": f"transformers.{type(model).__name__}.from_pretrained('DIR')",
                **({"processor": "transformers.AutoImageProcessor.from_pretrained('DIR')"} if proc is not None else {})}

    def export_native(self, model, out, src):
        return self.hub_files(model, out, src, weights=True)

    def stream_layout(self, shaped, *, tower_only, native, sharded):
        # from_pretrained reads one model.safetensors or HF-style shards beside its config.json
        return "shards"

    def export_streamed(self, meta, out, src, layout, tower_only):
        if tower_only is not None:
            return super().export_streamed(meta, out, src, layout, tower_only)
        return self.hub_files(meta, out, src, weights=False)

    def card_info(self, model, src, random_init=False):
        name = src.name if src is not None else ""
        hub = bool(name) and not Path(name).exists() and name.count("/") == 1 and not random_init
        clip = hasattr(model, "get_text_features")
        return {"library_name": "transformers",
                "pipeline_tag": "zero-shot-image-classification" if clip else "image-feature-extraction",
                "base_model": name if hub else None, "license": None}

    def saved_preprocess(self, model, saved, directory, image_size=None):
        import transformers

        proc = None
        if directory is not None and (Path(directory) / "preprocessor_config.json").is_file():
            proc = transformers.AutoImageProcessor.from_pretrained(str(directory))
        elif saved.get("processor") and hasattr(transformers, saved["processor"]):
            keep = {k: v for k, v in saved.items() if k not in ("library", "processor")}
            proc = getattr(transformers, saved["processor"]).from_dict(keep)
        if proc is None:
            return super().saved_preprocess(model, saved, directory, image_size)
        return self.processor_preprocess(model, proc, image_size)

def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


class _ProcessorTransform:
    """An image processor as a PIL image -> (3, H, W) tensor transform (a class, not a
    closure, so DataLoader workers can pickle it)."""

    def __init__(self, proc: Any, kwargs: dict[str, Any]) -> None:
        self.proc, self.kwargs = proc, kwargs

    def __call__(self, img: Any) -> torch.Tensor:
        return self.proc(images=img, return_tensors="pt", **self.kwargs)["pixel_values"][0]


_ANY_SIZE = {"dinov2"}  # model types whose embeddings take any image size

# where a processor class's defaults differ from the checkpoints' published settings
_PUBLISHED = {"dinov2": {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                         "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}}


def _image_processor(model, src) -> Any:
    """The model's image processor: the one its dgmr directory saved, a local one (a directory,
    or the hub cache; never a download), else the processor class of the model type with its defaults; None if the
    model type has none."""
    import transformers
    from transformers.models.auto import image_processing_auto as auto

    saved = getattr(model, "dgmr_preprocess", None)  # what the dgmr directory it came from saved
    if isinstance(saved, dict) and saved.get("library") == "hf" and hasattr(transformers, str(saved.get("processor"))):
        keep = {k: v for k, v in saved.items() if k not in ("library", "processor")}
        return getattr(transformers, saved["processor"]).from_dict(keep)
    if src is not None and src.name:
        try:
            return transformers.AutoImageProcessor.from_pretrained(src.name, local_files_only=True)
        except Exception:  # not cached / no processor files: the class defaults below
            pass
    mt = str(getattr(model.config, "model_type", ""))
    names = auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(mt) or auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(
        mt.removesuffix("_vision_model"))
    if isinstance(names, dict):  # transformers 5: {"torchvision": ..., "pil": ...}
        names = [names.get("torchvision"), names.get("pil")]
    elif isinstance(names, str):
        names = [names]
    for name in names or ():
        cls = getattr(transformers, name, None) if name else None
        if cls is not None:
            try:
                return cls(**_PUBLISHED.get(mt, {}))
            except ImportError:  # e.g. a torchvision backend that is not installed
                continue
    return None


def _side(d: Any) -> int | None:
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d or {})
    return d.get("height") or d.get("shortest_edge")


def _resized(proc: Any, size: int) -> dict[str, Any]:
    """Call arguments that make the processor output ``size`` x ``size`` (the class defaults
    are for the published 224 px models; a small or re-sized model needs its own size),
    keeping the processor's resize-to-crop ratio."""
    crop = getattr(proc, "do_center_crop", False) and getattr(proc, "crop_size", None)
    out = _side(crop) if crop else _side(getattr(proc, "size", None))
    if out is None or out == size:
        return {}
    resize = getattr(proc, "size", None)
    resize = resize.to_dict() if hasattr(resize, "to_dict") else dict(resize or {})
    if crop:
        if resize.get("shortest_edge"):
            return {"size": {"shortest_edge": round(resize["shortest_edge"] * size / out)},
                    "crop_size": {"height": size, "width": size}}
        side = round((resize.get("height") or out) * size / out)
        return {"size": {"height": side, "width": side}, "crop_size": {"height": size, "width": size}}
    if resize.get("shortest_edge"):
        return {"size": {"shortest_edge": size}}
    return {"size": {"height": size, "width": size}}


def _sized_processor(model, proc: Any) -> Any:
    """``proc`` set to output the model's input size (what :func:`_resized` passes per call), so
    that a pipeline built on the saved processor feeds the model what it takes."""
    if str(getattr(model.config, "model_type", "")) in _ANY_SIZE:
        return proc
    kwargs = _resized(proc, int(HFFamily().image_size(model)))
    if not kwargs:
        return proc
    return type(proc).from_dict({**{k: v for k, v in proc.to_dict().items() if not k.startswith("_")}, **kwargs})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "spiece.model", "tokenizer.model")


def _copy_tokenizer(src_dir: str, out: Path) -> list[str]:
    """The tokenizer files of a CLIP-style source folder (zero-shot needs them beside the model)."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, out / name)
            copied.append(name)
    return copied
