"""open_clip models: ``VisionTransformer`` towers (ViT-B/L/H/g/bigG) and ``TimmModel`` towers
(EVA-CLIP). Only ``model.visual`` is pruned; the text tower is kept as is.

Exported in open_clip's hub layout (``open_clip_config.json`` beside ``model.safetensors``:
``local-dir:``, ``hf-hub:``); timm towers take no MLP width in open_clip's JSON, so their
trunk is described for timm in ``timm_trunk/``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..sources import Source, build_model
from ..transforms import EvalPreprocess
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Family, loaded_module, register_family, uniform_ratio
from .timm import TimmFamily, final_block_tokens, is_eva, shared_head_tables, timm_blocks


@register_family(builtin=True)
class OpenClipFamily(Family):
    name = "open_clip"
    library = "open_clip"

    @classmethod
    def classes(cls):
        oc = loaded_module("open_clip")
        if oc is None:
            return ()
        return tuple(c for c in (getattr(oc, "CLIP", None), getattr(oc, "CustomTextCLIP", None),
                                 getattr(oc, "CoCa", None)) if isinstance(c, type))

    def vision_root(self, model):
        return "visual", model.visual

    def image_forward(self, model, x):
        return model.encode_image(x)

    def attention(self, model):
        sites = super().attention(model)
        why = shared_head_tables(model.visual.trunk) if self._is_timm_tower(model) else None
        for s in sites if why else ():
            s.refuse = s.refuse or why
        return sites

    def image_size(self, model):
        s = getattr(model.visual, "image_size", 224)
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    def data_config(self, model):
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        mean = tuple(pp.get("mean") or getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        std = tuple(pp.get("std") or getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD)
        return {"image_size": self.image_size(model), "mean": mean, "std": std}

    def preprocess_cfg(self, model, src: Source | None = None) -> dict[str, Any]:
        """open_clip's full preprocess config: its defaults, then what the model carries, then
        the pretrained tag's entry of open_clip's offline metadata (a random-init or dgmr-loaded
        model was built without the tag, so its own config lacks e.g. SigLIP's squash resize)."""
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        pp = merge_preprocess_dict(PreprocessCfg(), dict(getattr(model.visual, "preprocess_cfg", {}) or {}))
        if src is not None and src.tag and not src.name.startswith(("hf-hub:", "local-dir:")):
            pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(src.name, src.tag) or {})
        pp["size"] = getattr(model.visual, "image_size", None) or pp["size"]
        return pp

    def eval_preprocess(self, model, src=None, image_size=None):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pp = self.preprocess_cfg(model, src)
        if image_size:
            pp["size"] = (int(image_size), int(image_size))
        tf = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        return EvalPreprocess(tf, {"library": "open_clip", **pp})

    def features(self, model, x):
        visual = model.visual
        if self._is_timm_tower(model):
            trunk = visual.trunk
            prefix = getattr(trunk, "num_prefix_tokens", 1)
            if is_eva(trunk):  # EVA-CLIP recipe: final-block tokens, final norm and head removed
                tokens = final_block_tokens(trunk, x)
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

    def sequential_blocks(self, model):
        if self._is_timm_tower(model):  # EVA-CLIP & co: the timm trunk's blocks
            return timm_blocks(model.visual.trunk, "visual.trunk") or super().sequential_blocks(model)
        blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
        if blocks is None:
            return super().sequential_blocks(model)
        return [(f"visual.transformer.resblocks.{i}", b) for i, b in enumerate(blocks)]

    @staticmethod
    def _is_timm_tower(model) -> bool:
        return hasattr(model.visual, "trunk")

    def export_trunk(self, model, out: Path, src: Source) -> dict[str, Any]:
        """open_clip's timm towers take no MLP width in their JSON: the trunk, built the way
        open_clip's TimmModel builds it, is described for timm in ``out/timm_trunk`` and reads
        its weights from ``out/model.safetensors``."""
        vc = src.model_cfg["vision_cfg"]
        pool, proj = vc.get("timm_pool", "avg"), vc.get("timm_proj", "linear")
        trunk = model.visual.trunk
        if proj in ("linear", "mlp") or pool in ("abs_attn", "rot_attn"):
            kwargs = {"num_classes": 0}
            reset = {"num_classes": 0, "global_pool": "" if pool in ("abs_attn", "rot_attn") else pool} if pool else None
        else:
            kwargs, reset = {"num_classes": trunk.num_classes, "global_pool": pool}, None
        note = TimmFamily().export_trunk(trunk, out / "timm_trunk", Source("timm", vc["timm_model_name"], kwargs=kwargs),
                                         reset)
        why = ("open_clip's model config has no MLP width for timm towers, so open_clip.create_model cannot "
               "rebuild the pruned tower")
        if "skipped" in note:
            return {"skipped": f"{why}; nor can timm: {note['skipped']}"}
        note["then"] = ("assign it to the unpruned open_clip model's visual.trunk (its visual.head weights are in "
                        "DIR/model.safetensors too), or use dgmr.load(DIR)")
        note["library_loader"] = why
        return note

    def local_dir_config(self, model, src: Source) -> dict[str, Any]:
        """open_clip_config.json as open_clip's own hub export writes it: the model config and
        the full preprocess config (size, mean, std, interpolation, resize mode)."""
        pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg(model, src).items()}
        return {"model_cfg": src.model_cfg, "preprocess_cfg": pp}

    def export_native(self, model, out, src):
        if src is None or src.model_cfg is None:
            return {"skipped": "no open_clip model config recorded"}
        if src.kwargs:  # e.g. force_quick_gelu changes the forward: a local-dir config without it would differ
            return {"skipped": f"open_clip's local-dir config cannot record the create_model arguments "
                               f"{sorted(src.kwargs)}; use dgmr.load"}
        if self._is_timm_tower(model):
            return self.export_trunk(model, out, src)
        cut = [s.name for s in self.attention(model) if not isinstance(s.module, nn.MultiheadAttention)]
        if cut:
            return {"skipped": f"attention heads were cut ({cut[0]}...): open_clip's config sets heads = width / "
                               "head_width in every block and nn.MultiheadAttention ties them to the width; use dgmr.load"}

        def build(r: float):
            cfg = json.loads(json.dumps(src.model_cfg))
            cfg["vision_cfg"]["mlp_ratio"] = r
            digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
            return build_model(Source("open_clip", f"dgmr-verify-{digest}", model_cfg=cfg), meta=True)

        r = uniform_ratio(model, build, self)
        if r is None:
            return {"skipped": "no single open_clip mlp_ratio rebuilds these shapes (per-layer MLP widths differ); "
                               "use dgmr.load"}
        config = self.local_dir_config(model, src)
        config["model_cfg"] = json.loads(json.dumps(config["model_cfg"]))
        config["model_cfg"]["vision_cfg"]["mlp_ratio"] = r
        (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return {"format": "open_clip hub (local-dir / hf-hub)", "files": ["open_clip_config.json", "model.safetensors"],
                "mlp_ratio": r, "load": "open_clip.create_model_and_transforms('local-dir:DIR')"}

    def export_streamed(self, meta, out, src, layout, tower_only):
        if not self._is_timm_tower(meta) or layout != "file":
            return super().export_streamed(meta, out, src, layout, tower_only)
        # timm reads the trunk straight from model.safetensors (its filters strip visual.trunk.)
        return self.export_trunk(meta, out, src)

    def card_info(self, model, src, random_init=False):
        base = None
        if src is not None and not random_init:
            if src.name.startswith("hf-hub:"):
                base = src.name.removeprefix("hf-hub:")
            elif src.tag:
                import open_clip

                base = (open_clip.get_pretrained_cfg(src.name, src.tag) or {}).get("hf_hub")
        return {"library_name": "open_clip", "pipeline_tag": "zero-shot-image-classification",
                "base_model": base.strip("/") if base else None, "license": None}

    def saved_preprocess(self, model, saved, directory, image_size=None):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pp = {k: v for k, v in saved.items() if k != "library"}
        if image_size:
            pp["size"] = (int(image_size), int(image_size))
        pp["size"] = tuple(pp["size"]) if isinstance(pp.get("size"), list) else pp.get("size")
        return EvalPreprocess(image_transform_v2(PreprocessCfg(**pp), is_train=False), {"library": "open_clip", **pp})
