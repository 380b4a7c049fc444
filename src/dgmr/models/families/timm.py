"""timm models: VisionTransformer (ViT, DeiT, DINOv2), Eva (EVA02, EVA-CLIP trunks), Swin,
ConvNeXt, MetaFormer (PoolFormer, ConvFormer, CAFormer), ...

Exported in timm's hub layout: ``config.json`` (architecture, ``model_args`` with the new
``mlp_ratio``, ``pretrained_cfg``) beside ``model.safetensors``, what
``timm.create_model('local-dir:DIR')`` and ``hf-hub:`` read; a Swin whose heads were cut
stage by stage has ``num_heads`` and ``head_dim`` per stage there too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..sources import Source
from ..transforms import EvalPreprocess
from .base import Blocks, Family, loaded_module, register_family, uniform_ratio


def is_eva(model: nn.Module) -> bool:
    """timm's EVA / EVA02 towers (also the trunks of open_clip's EVA-CLIP models)."""
    tm = loaded_module("timm")
    return tm is not None and isinstance(model, tm.models.Eva)


def final_block_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the last transformer block (before the final norm) of a timm ViT-like model."""
    seen: list[torch.Tensor] = []
    handle = model.blocks[-1].register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    return seen[-1]


def _channels_last(model: nn.Module, feats: torch.Tensor) -> bool:
    """Whether a 4-D ``forward_features`` output is (B, H, W, C) (Swin & co) rather than
    (B, C, H, W) (ConvNeXt, MetaFormer): the model's ``output_fmt`` when it declares one,
    else where its ``num_features`` channels are; NHWC when that cannot tell."""
    fmt = getattr(model, "output_fmt", None)
    if fmt in ("NHWC", "NCHW"):
        return fmt == "NHWC"
    c = getattr(model, "num_features", None)
    return not (feats.shape[1] == c and feats.shape[-1] != c)


def _sequence(m: Any) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 0


def timm_blocks(model: nn.Module, prefix: str = "") -> Blocks | None:
    """The sequential blocks of a timm tower: its ``blocks`` (ViT, DeiT, DINOv2, EVA, BEiT...),
    or, stage by stage, each stage's ``downsample`` and then its ``blocks`` (Swin, ConvNeXt,
    MetaFormer: their stages run exactly that). A MetaFormer stage that is not NCHW reshapes
    to tokens between the two, so it is one block. None: neither layout."""
    at = f"{prefix}." if prefix else ""
    if _sequence(getattr(model, "blocks", None)):
        return [(f"{at}blocks.{i}", b) for i, b in enumerate(model.blocks)]
    for attr in ("stages", "layers"):
        stages = getattr(model, attr, None)
        if not (_sequence(stages) and all(_sequence(getattr(s, "blocks", None)) for s in stages)):
            continue
        out: Blocks = []
        for i, stage in enumerate(stages):
            path = f"{at}{attr}.{i}"
            if getattr(stage, "use_nchw", True) is False:
                out.append((path, stage))
                continue
            if isinstance(getattr(stage, "downsample", None), nn.Module):
                out.append((f"{path}.downsample", stage.downsample))
            out += [(f"{path}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
        return out
    return None


def _takes_mlp_ratio(build) -> bool:
    """Whether the timm model's MLP widths follow an ``mlp_ratio`` kwarg (built on meta: no
    memory): some timm versions refuse the argument (ConvNeXt, MetaFormer), others take it
    through ``**kwargs`` and ignore it."""
    try:
        a, b = build(4.0), build(2.0)
    except TypeError as e:  # "unexpected keyword argument 'mlp_ratio'" (ConvNeXt, MetaFormer)
        return "mlp_ratio" not in str(e)
    except Exception:  # anything else is not about the argument: let the caller's message stand
        return True
    shapes = lambda m: [tuple(t.shape) for t in m.state_dict().values()]  # noqa: E731
    return shapes(a) != shapes(b)


def shared_head_tables(model: nn.Module) -> str | None:
    """Why heads cannot be cut layer by layer in this timm model, if they cannot: a per-head
    table that one module outside the blocks holds for all of them."""
    if getattr(model, "rel_pos_bias", None) is not None:  # BEiT use_shared_rel_pos_bias
        return "the relative position bias table is shared by all blocks (one column per head)"
    mixed = getattr(loaded_module("timm.layers"), "RotaryEmbeddingMixed", None)
    if isinstance(mixed, type) and isinstance(getattr(model, "rope", None), mixed):
        return "the rotary frequencies are learned per head and shared by all blocks (rope_type='mixed')"
    return None


def _stage_heads(model: nn.Module, sites: list) -> dict[str, Any] | None:
    """Swin's ``num_heads`` and ``head_dim`` per stage, when every block of a stage keeps the same heads."""
    swin = getattr(loaded_module("timm.models.swin_transformer"), "SwinTransformer", None)
    if not (isinstance(swin, type) and isinstance(model, swin)):
        return None
    by_stage: dict[int, set[tuple[int, int]]] = {}
    for s in sites:
        parts = s.name.split(".")  # layers.{stage}.blocks.{block}.attn
        if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
            return None
        by_stage.setdefault(int(parts[1]), set()).add((s.heads, s.head_dim))
    if sorted(by_stage) != list(range(len(model.layers))) or any(len(v) != 1 for v in by_stage.values()):
        return None
    per = [next(iter(by_stage[i])) for i in range(len(model.layers))]
    return {"num_heads": tuple(h for h, _ in per), "head_dim": tuple(d for _, d in per)}


def head_kwargs(model: nn.Module, family: Family, original: nn.Module) -> tuple[dict[str, Any] | None, str]:
    """(create_model kwargs that rebuild the head counts of ``model``, or None and why none do);
    {} when no head was cut (``original``: the architecture as its source builds it)."""
    sites = family.attention(model)
    before = {s.name: s.heads for s in family.attention(original)}
    if all(before.get(s.name) == s.heads for s in sites):
        return {}, ""
    kwargs = _stage_heads(model, sites)
    if kwargs is None:
        return None, (f"timm's {type(model).__name__} takes no per-layer head count at a fixed head dim (its num_heads "
                      "sets head_dim = embed_dim / num_heads, for every block); use dgmr.load")
    return kwargs, ""


@register_family(builtin=True)
class TimmFamily(Family):
    name = "timm"
    library = "timm"

    @classmethod
    def detect(cls, model):
        # timm models share no base class: an instance of any class timm defines (a user's
        # subclass of a timm VisionTransformer included) is a timm model
        return loaded_module("timm") is not None and any(
            c.__module__.startswith("timm.") for c in type(model).__mro__ if issubclass(c, nn.Module))

    def attention(self, model):
        sites = super().attention(model)
        why = shared_head_tables(model)
        for s in sites if why else ():
            s.refuse = s.refuse or why
        return sites

    def image_size(self, model):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        return int(img[0]) if img else int(size[-1])

    def data_config(self, model):
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        return {"image_size": self.image_size(model), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}

    def eval_preprocess(self, model, src=None, image_size=None):
        import timm.data

        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        # the architecture's input size wins over its pretrained_cfg's (a model built with img_size=...)
        size = (int(image_size),) * 2 if image_size else tuple(int(v) for v in img) if img else None
        cfg = timm.data.resolve_data_config({"input_size": (3, *size)} if size else {}, model=model)
        tf = timm.data.create_transform(**cfg, is_training=False)
        return EvalPreprocess(tf, {"library": "timm", **cfg})

    def features(self, model, x):
        if is_eva(model):  # EVA-CLIP recipe: final-block tokens, final norm and head removed
            tokens = final_block_tokens(model, x)
            return {"pooled": tokens[:, 0], "tokens": tokens[:, getattr(model, "num_prefix_tokens", 1):]}
        tokens = model.forward_features(x)
        if tokens.ndim == 4 and not _channels_last(model, tokens):  # ConvNeXt, MetaFormer: (B, C, H, W)
            return {"pooled": model.forward_head(tokens, pre_logits=True), "tokens": tokens.flatten(2).transpose(1, 2)}
        if tokens.ndim == 4:  # Swin & co: (B, H, W, C)
            tokens = tokens.flatten(1, 2)
            return {"pooled": tokens.mean(1), "tokens": tokens}
        prefix = getattr(model, "num_prefix_tokens", 0)
        pooled = model.forward_head(tokens, pre_logits=True)
        return {"pooled": pooled, "tokens": tokens[:, prefix:]}

    def sequential_blocks(self, model):
        return timm_blocks(model) or super().sequential_blocks(model)

    # create_model arguments that are not architecture: never recorded as a hub config's model_args
    NOT_ARCHITECTURE = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                        "device", "dtype", "pretrained_strict")

    @classmethod
    def architecture(cls, model: nn.Module, src: Source | None) -> tuple[str, dict[str, Any]]:
        """(timm registry name, create_model architecture arguments) of ``model``: a timm name's
        kwargs, or a hub-layout folder's (``timm:local-dir:DIR``) ``architecture`` and
        ``model_args`` with the user's kwargs on top."""
        hub = (src.model_cfg or {}) if src is not None else {}
        name = hub.get("architecture") or (src.name if src is not None else None)
        name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        kwargs = {**(hub.get("model_args") or {}), **(src.kwargs if src is not None else {})}
        return name, {k: v for k, v in kwargs.items() if k not in cls.NOT_ARCHITECTURE}

    def model_args_for(self, model, name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """(the create_model arguments whose architecture has ``model``'s shapes: ``kwargs`` with
        the cut heads where timm can say them (Swin) and the mlp_ratio, or None with the reason)."""
        import timm

        with torch.device("meta"):
            original = timm.create_model(name, pretrained=False, **kwargs)
        heads, why = head_kwargs(model, self, original)
        if heads is None:
            return None, why
        kwargs = {**kwargs, **heads}

        def build(r: float):
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **{**kwargs, "mlp_ratio": r})

        r = uniform_ratio(model, build, self)
        if r is None and not _takes_mlp_ratio(build):
            return None, (f"timm {name} takes no mlp_ratio argument (timm's ConvNeXt and MetaFormer fix their MLP "
                          "widths), so no timm config rebuilds the pruned widths; use dgmr.load")
        if r is None:
            return None, ("no single timm mlp_ratio rebuilds these shapes (per-layer MLP widths, or a head MLP timm "
                          "sizes from the same ratio, e.g. attn_pool); use dgmr.load")
        return {**kwargs, "mlp_ratio": r}, ""

    def hub_config(self, model, name: str, model_args: dict[str, Any]) -> dict[str, Any]:
        """config.json in the format timm's own hub export writes (``save_config_for_hf``):
        the architecture, class count, feature width, global pool, the ``create_model``
        arguments that rebuild the pruned shapes, and the pretrained config (preprocessing,
        label names, license) without its source fields. ``custom_load`` is off: the weights
        are a plain timm state dict, never the original JAX checkpoint some configs expect."""
        import timm.data
        import timm.models

        pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
        pcfg = timm.models.filter_pretrained_cfg({k: v for k, v in pcfg.items() if k != "state_dict"},
                                                 remove_source=True, remove_null=True)
        data = timm.data.resolve_data_config({}, model=model)
        pcfg.update({k: data[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                     if k in data})
        pcfg.update(architecture=name, custom_load=False, num_classes=model.num_classes)
        if pcfg.get("label_names") is not None and len(pcfg["label_names"]) != model.num_classes:
            pcfg.pop("label_names", None)
            pcfg.pop("label_descriptions", None)
        config = {"architecture": name, "num_classes": model.num_classes,
                  "num_features": getattr(model, "num_features", None)}
        pool = getattr(model, "global_pool", None)
        if isinstance(pool, str) and pool:
            config["global_pool"] = pool
        return {**config, "model_args": model_args, "pretrained_cfg": pcfg}

    def export_native(self, model, out, src):
        """timm's hub layout: config.json beside model.safetensors, so that
        ``timm.create_model('local-dir:DIR', pretrained=True)`` (and ``hf-hub:`` once uploaded)
        rebuilds and loads the pruned model."""
        if src is None:
            return {"skipped": "no timm model name recorded"}
        name, kwargs = self.architecture(model, src)
        model_args, why = self.model_args_for(model, name, kwargs)
        if model_args is None:
            return {"skipped": why}
        try:
            text = json.dumps(self.hub_config(model, name, model_args), indent=2)
        except TypeError as e:  # a create_model argument given from Python that JSON cannot hold
            return {"skipped": f"timm's config.json cannot hold these create_model arguments ({e}); use dgmr.load"}
        (out / "config.json").write_text(text + "\n")
        return {"format": "timm hub (local-dir / hf-hub)", "files": ["config.json", "model.safetensors"],
                "mlp_ratio": model_args["mlp_ratio"], "load": "timm.create_model('local-dir:DIR', pretrained=True)"}

    def export_trunk(self, model, out: Path, src: Source, reset: dict[str, Any] | None) -> dict[str, Any]:
        """An open_clip timm tower's trunk, for timm: ``timm_config.json`` (name + kwargs) in
        ``out``, its weights read from the dgmr directory's model.safetensors (timm's ViT and EVA
        checkpoint filters strip open_clip's ``visual.trunk.`` prefix): the weights stay stored once."""
        name, kwargs = self.architecture(model, src)
        kwargs, why = self.model_args_for(model, name, kwargs)
        if kwargs is None:
            return {"skipped": why}
        out.mkdir(parents=True, exist_ok=True)
        (out / "timm_config.json").write_text(json.dumps(
            {"model_name": name, "kwargs": kwargs, **({"reset_classifier": reset} if reset else {})}, indent=2))
        # custom_load=False: some timm versions read a configured JAX .npz loader for a plain file
        load = (f"timm.create_model({name!r}, pretrained=True, "
                "pretrained_cfg_overlay=dict(file='DIR/model.safetensors', custom_load=False), "
                + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")")
        if reset:
            load += "; trunk.reset_classifier(" + ", ".join(f"{k}={v!r}" for k, v in reset.items()) + ")"
        return {"format": "timm pretrained_cfg_overlay", "files": [f"{out.name}/timm_config.json"], "mlp_ratio": kwargs["mlp_ratio"],
                "load": "trunk = " + load, "weights": "model.safetensors"}

    def card_info(self, model, src, random_init=False):
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        hub = pcfg.get("hf_hub_id")
        return {"library_name": "timm",
                "pipeline_tag": "image-classification" if getattr(model, "num_classes", 0) else "image-feature-extraction",
                "base_model": hub.rstrip("/") if hub and not random_init else None,
                "license": pcfg.get("license") if not random_init else None}

    def saved_preprocess(self, model, saved, directory, image_size=None):
        import timm.data

        cfg = {k: v for k, v in saved.items() if k != "library"}
        if image_size:
            cfg["input_size"] = (3, int(image_size), int(image_size))
        tf = timm.data.create_transform(**cfg, is_training=False)
        return EvalPreprocess(tf, {"library": "timm", **cfg})
