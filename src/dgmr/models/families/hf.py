"""Hugging Face transformers models: ViT, CLIP (vision tower), DINOv2 (plain and SwiGLU), SigLIP.

Exported with ``save_pretrained`` into ``hf/``, the config's ``intermediate_size`` or
``mlp_ratio`` set to the pruned width where one value can describe it.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .base import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Family, _uniform_ratio,
                   loaded_module, register_family, site_widths)


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

    def width_fields(self, model, sites) -> tuple[dict[str, Any] | None, str]:
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

            r = _uniform_ratio(model, build, self)
            if r is None:
                return None, (f"no {name}.mlp_ratio (of type {type(vc.mlp_ratio).__name__}) builds hidden width "
                              f"{widths[0]} for embed dim {sites[0].in_features}; pick another width")
            return {"mlp_ratio": r}, ""
        return None, f"{name} has no intermediate_size or mlp_ratio field"

    def update_config(self, model, src):
        fields, _ = self.width_fields(model, self.mlps(model))
        if fields is None:
            return {}
        vc = self._vision_config(model.config)
        for k, v in fields.items():
            setattr(vc, k, v)
        return fields

    def export_native(self, model, out, src):
        fields, why = self.width_fields(model, self.mlps(model))
        if fields is None:
            return {"skipped": why}
        self.update_config(model, src)
        model.save_pretrained(out / "hf", safe_serialization=True)
        return {"format": "transformers save_pretrained", "files": ["hf/"],
                "load": f"transformers.{type(model).__name__}.from_pretrained('DIR/hf')"}

    def stream_layout(self, shaped, *, tower_only, native, sharded):
        # from_pretrained reads HF-style shards beside its config: write them there when a
        # config can describe the widths
        if native and not tower_only and self.width_fields(shaped, self.mlps(shaped))[0] is not None:
            return "hf"
        return "shards"

    def export_streamed(self, meta, out, src, layout, tower_only):
        if tower_only is not None:
            return super().export_streamed(meta, out, src, layout, tower_only)
        if layout != "hf":
            return {"skipped": self.width_fields(meta, self.mlps(meta))[1]}
        meta.config.save_pretrained(out / "hf")
        return {"format": "transformers from_pretrained", "files": ["hf/"],
                "load": f"transformers.{type(meta).__name__}.from_pretrained('DIR/hf')"}
