"""Tiny random-init configurations of the real architecture classes of every supported family.

Each case builds a :class:`dgmr.Source` (writing an HF config dir or an open_clip model config
into ``tmp`` when needed) so the same spec can be rebuilt by ``dgmr.load``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dgmr.models.sources import Source

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_OPEN_CLIP_TIMM = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224", "timm_model_pretrained": False,
                   "timm_pool": "token", "timm_proj": "linear"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_open_clip(tmp: Path, name: str, cfg: dict[str, Any]) -> None:
    import open_clip

    if open_clip.get_model_config(name) is None:
        p = tmp / f"{name}.json"
        p.write_text(json.dumps(cfg))
        open_clip.add_model_config(p)


def hf_dir(tmp: Path, name: str, make_config: Callable[[], Any]) -> str:
    d = tmp / name
    if not (d / "config.json").exists():
        make_config().save_pretrained(d)
    return f"hf:{d}"


class GenericNet(nn.Module):
    """A model from no known library: blocks with an `mlp` Sequential(Linear, GELU, Linear)."""

    def __init__(self, d: int = 16, h: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(d), "mlp": nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))})
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.unfold(x, 8, stride=8).transpose(1, 2)
        x = self.embed(x)
        for b in self.blocks:
            x = x + b["mlp"](b["norm"](x))
        return x


@dataclass
class Case:
    id: str
    family: str
    image_size: int
    make: Callable[[Path], Source | None] = field(repr=False)
    kinds: tuple[str, ...] = ()
    # False where the library's config cannot express a pruned width at all (timm ConvNeXt and
    # MetaFormer take no mlp_ratio): the native export is skipped and says why
    native: bool = True
    # the attention kinds dgmr finds (tests/test_heads.py); () for models without attention
    attention: tuple[str, ...] = ()
    # whether the library's config can say cut heads (at the original head dim): timm Swin, HF ViT/DINOv2
    native_heads: bool = False


def _hf_cases() -> list[Case]:
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    return [
        Case("hf_vit", "hf", 32, lambda t: _src(hf_dir(t, "vit", lambda: T.ViTConfig(intermediate_size=128, **small))), ("fc1_fc2",),
             attention=("hf_qkv",), native_heads=True),
        Case("hf_clip_vision", "hf", 32, lambda t: _src(hf_dir(t, "clipv", lambda: T.CLIPVisionConfig(intermediate_size=128, **small))), ("fc1_fc2",),
             attention=("hf_qkv",)),
        Case("hf_clip", "hf", 32, lambda t: _src(hf_dir(t, "clip", lambda: T.CLIPConfig(
            vision_config=dict(intermediate_size=128, **small),
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            projection_dim=16))), ("fc1_fc2",), attention=("hf_qkv",)),
        Case("hf_dinov2", "hf", 32, lambda t: _src(hf_dir(t, "dinov2", lambda: T.Dinov2Config(mlp_ratio=4, **small))), ("fc1_fc2",),
             attention=("hf_qkv",), native_heads=True),
        Case("hf_dinov2_swiglu", "hf", 32, lambda t: _src(hf_dir(t, "dinov2s", lambda: T.Dinov2Config(
            mlp_ratio=4, use_swiglu_ffn=True, **small))), ("gate_up_down",), attention=("hf_qkv",),
             native_heads=True),
        Case("hf_siglip_vision", "hf", 32, lambda t: _src(hf_dir(t, "siglipv", lambda: T.SiglipVisionConfig(intermediate_size=128, **small))), ("fc1_fc2",),
             attention=("hf_qkv",)),
    ]


def _src(spec: str, kwargs: dict[str, Any] | None = None) -> Source:
    from dgmr.models.sources import parse_spec

    return parse_spec(spec, kwargs)


def _open_clip(t: Path) -> Source:
    register_open_clip(t, "dgmr-tiny-ViT", TINY_OPEN_CLIP)
    return _src("open_clip:dgmr-tiny-ViT")


def _open_clip_timm(t: Path) -> Source:
    register_open_clip(t, "dgmr-tiny-EVA", TINY_OPEN_CLIP_TIMM)
    return _src("open_clip:dgmr-tiny-EVA")


def _tiny_poolformer(t: Path) -> Source:
    """timm's MetaFormer as poolformer_s12 builds it (1x1-conv MLPs, GroupNorm1), at tiny dims.
    poolformer_s12 fixes depths/dims (passing them again is a TypeError), so a tiny entry point
    is registered with timm, like the open_clip configs above; dgmr.load rebuilds it by name."""
    import timm
    from timm.models import register_model
    from timm.models.metaformer import _create_metaformer

    if not timm.models.is_model("dgmr_tiny_poolformer"):
        def dgmr_tiny_poolformer(pretrained=False, **kwargs):
            return _create_metaformer("poolformer_s12", pretrained=pretrained, **dict(dict(
                depths=(1, 1), dims=(16, 24), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
                norm_layers=timm.layers.GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                use_mlp_head=False), **kwargs))

        register_model(dgmr_tiny_poolformer)
    return _src("timm:dgmr_tiny_poolformer")


# ConvNeXt at tiny widths that still differ per stage (like atto's 40/80/160/320)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))

CASES: list[Case] = [
    Case("timm_vit", "timm", 32, lambda t: _src("timm:vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)), ("fc1_fc2",),
         attention=("timm_attention",)),
    Case("timm_dinov2_swiglu_packed", "timm", 28, lambda t: _src("timm:vit_giant_patch14_dinov2", dict(
        img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2)), ("timm_glu_packed",),
         attention=("timm_attention",)),
    Case("timm_eva02_glu", "timm", 28, lambda t: _src("timm:eva02_tiny_patch14_224", dict(img_size=28, depth=2)), ("timm_glu_packed",),
         attention=("timm_eva",)),
    Case("timm_eva02_swiglu_norm", "timm", 28, lambda t: _src("timm:eva02_tiny_patch14_224", dict(
        img_size=28, depth=2, scale_mlp=True)), ("swiglu_split",), attention=("timm_eva",)),
    # two blocks in the first stage (14 x 14 tokens, windows of 7): the second shifts its windows,
    # which gives it the attn_mask buffer timm builds from a parameter's device (meta, in dgmr.load)
    Case("timm_swin", "timm", 56, lambda t: _src("timm:swin_tiny_patch4_window7_224", dict(
        img_size=56, embed_dim=24, depths=(2, 1), num_heads=(1, 2), window_size=7)), ("fc1_fc2",),
         attention=("timm_window",), native_heads=True),
    Case("timm_convnext_conv_mlp", "timm", 32, lambda t: _src("timm:convnext_atto", dict(TINY_CONVNEXT, conv_mlp=True)),
         ("conv1x1",), native=False),
    Case("timm_convnext_linear_mlp", "timm", 32, lambda t: _src("timm:convnext_atto", dict(TINY_CONVNEXT, conv_mlp=False)),
         ("fc1_fc2",), native=False),
    Case("timm_convnextv2_conv_grn", "timm", 32, lambda t: _src("timm:convnextv2_atto", dict(TINY_CONVNEXT)),
         ("conv1x1",), native=False),
    Case("timm_convnextv2_linear_grn", "timm", 32, lambda t: _src("timm:convnextv2_atto", dict(
        TINY_CONVNEXT, conv_mlp=False)), ("fc1_fc2",), native=False),
    Case("timm_poolformer_conv_mlp", "timm", 32, _tiny_poolformer, ("conv1x1",), native=False),
    Case("open_clip_vit", "open_clip", 32, _open_clip, ("open_clip",), attention=("torch_mha",)),
    Case("open_clip_timm_tower", "open_clip", 224, _open_clip_timm, ("timm_glu_packed",), attention=("timm_eva",)),
    *_hf_cases(),
    Case("generic", "generic", 16, lambda t: None, ("generic",)),
]


class GenericAttention(nn.Module):
    """Multi-head self-attention from no known library: fused ``qkv``, ``proj``, ``num_heads``,
    head count read from ``num_heads`` and width from the tensors (the generic attention kind)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))


class GenericAttnNet(GenericNet):
    """:class:`GenericNet` with an attention layer (``attn``) before each MLP."""

    def __init__(self, d: int = 16, h: int = 64, depth: int = 2, heads: int = 4):
        super().__init__(d, h, depth)
        for b in self.blocks:
            b["attn"] = GenericAttention(d, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.unfold(x, 8, stride=8).transpose(1, 2)
        x = self.embed(x)
        for b in self.blocks:
            x = x + b["attn"](x)
            x = x + b["mlp"](b["norm"](x))
        return x


def _timm(name: str, **kwargs: Any) -> Callable[[Path], Source]:
    return lambda t: _src(f"timm:{name}", kwargs)


TINY_BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_EVA = dict(img_size=28, depth=2)

# attention layouts beyond CASES' (tests/test_heads.py only): qk-norm + scale norm, EVA with
# separate q/k/v and an inner norm, BEiT's per-layer relative position tables, a shifted Swin
# window, a generic module; and layouts dgmr refuses to cut (``refused``)
HEAD_CASES: list[Case] = [
    Case("timm_vit_qk_scale_norm", "timm", 32, _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                                      qk_norm=True, scale_attn_norm=True), attention=("timm_attention",)),
    Case("timm_eva02_split_inner_norm", "timm", 28, _timm("eva02_tiny_patch14_224", **TINY_EVA, qkv_fused=False,
                                                          scale_attn_inner=True), attention=("timm_eva",)),
    Case("timm_beit", "timm", 32, _timm("beit_base_patch16_224", **TINY_BEIT), attention=("timm_beit",)),
    Case("timm_swin_shifted", "timm", 56, _timm("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(2,),
                                                 num_heads=(2,), window_size=7), attention=("timm_window",),
         native_heads=True),
    Case("generic_attention", "generic", 16, lambda t: None, attention=("generic",)),
]
REFUSED_HEAD_CASES: list[Case] = [
    Case("timm_eva02_grouped_query", "timm", 28, _timm("eva02_tiny_patch14_224", **TINY_EVA, attn_type="rope",
                                                       qkv_fused=False, num_kv_heads=1), attention=("timm_attention",)),
    Case("timm_beit_shared_table", "timm", 32, _timm("beit_base_patch16_224", **TINY_BEIT, use_rel_pos_bias=False,
                                                     use_shared_rel_pos_bias=True), attention=("timm_beit",)),
]


def build(case: Case, tmp: Path) -> tuple[nn.Module, Source | None]:
    from dgmr.models.sources import build_model

    torch.manual_seed(0)
    src = case.make(tmp)
    if src is None:
        model = GenericAttnNet() if case.attention else GenericNet()
    else:
        model = build_model(src, pretrained=False)
    return model.eval(), src


def output(family, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vision tower's main output tensor, whatever the library returns."""
    out = family.image_forward(model, x)
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state
