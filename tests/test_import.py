"""dgmr import: checkpoints pruned elsewhere (open_clip, original EVA-CLIP and DINOv2 namings,
pickles and safetensors) become dgmr directories that load and run like the pruned module."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dgmr
from dgmr.models.families import family_of
from dgmr.prune.importer import import_checkpoint
from dgmr.models.sources import Source, build_model, parse_spec

from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder
from tiny_models import CASES, TINY_OPEN_CLIP, build, output, register_open_clip

EVA_TRUNK = "dgmr_test_eva02_swiglu_norm"
# an EVA-CLIP-like open_clip tower: a timm EVA02 trunk with split SwiGLU + hidden norm (EVA02-CLIP's
# w1/w2/ffn_ln/w3) whose classifier head is the projection (timm_proj None, as EVA02-E-14-plus)
TINY_EVA_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "timm_model_name": EVA_TRUNK, "timm_model_pretrained": False,
                   "timm_pool": "token", "timm_proj": None},
    "text_cfg": TINY_OPEN_CLIP["text_cfg"],
}
DINOV2 = ("timm:vit_giant_patch14_dinov2", dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2))


def _register_eva_trunk() -> None:
    import timm
    from timm.models import register_model
    from timm.models.eva import _create_eva

    if timm.is_model(EVA_TRUNK):
        return

    def dgmr_test_eva02_swiglu_norm(pretrained: bool = False, **kwargs):
        args = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
                    swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2))
        return _create_eva("eva02_tiny_patch14_224", pretrained=pretrained, **{**args, **kwargs})

    dgmr_test_eva02_swiglu_norm.__module__ = "timm.models.eva"
    register_model(dgmr_test_eva02_swiglu_norm)


def pruned(src: Source, seed: int = 0) -> tuple[torch.nn.Module, Source]:
    """``src`` random-init, pruned to different widths per layer (as a paper's release may be)."""
    torch.manual_seed(seed)
    model = build_model(src, pretrained=False)
    sites = family_of(model).mlps(model)
    dgmr.prune(model, widths=[max(1, s.hidden // (2 + i)) for i, s in enumerate(sites)], progress=False)
    return model.eval(), src


def same_forward(model: torch.nn.Module, out: Path, size: int) -> None:
    loaded = dgmr.load(out)
    fam = family_of(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(output(fam, model, x), output(family_of(loaded), loaded, x))


def renamed(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v.detach().clone()
    return out


def save_pth(sd: dict[str, torch.Tensor], path: Path, nest: str | None = None, prefix: str = "") -> Path:
    sd = {prefix + k: v for k, v in sd.items()}
    torch.save({nest: sd, "epoch": 3} if nest else sd, path)
    return path


def save_st(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------
# (a) open_clip naming
def test_open_clip_pth_nested_with_module_prefix(tmp_path, cli):
    case = next(c for c in CASES if c.id == "open_clip_vit")
    src = case.make(tmp_path)
    model, _ = pruned(src)
    ckpt = save_pth(model.state_dict(), tmp_path / "distill.pth", nest="model", prefix="module.")
    code, out, err = cli("import", src.spec, ckpt, "--out", tmp_path / "imp", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["checkpoint_format"] == "torch pickle" and res["criterion"] == "unknown"
    assert res["hidden_after"] == sorted({s.hidden for s in family_of(model).mlps(model)})
    same_forward(model, tmp_path / "imp", case.image_size)
    cfg = json.loads((tmp_path / "imp" / "dgmr.json").read_text())
    assert cfg["imported_from"] == {"checkpoint": str(ckpt), "format": "torch pickle", "nested_under": "model",
                                    "prefix_removed": "module."}
    assert cfg["prune"]["criterion"] == "unknown" and cfg["prune"]["kept_indices"] == "unknown"
    assert not list((tmp_path / "imp").rglob("kept_indices.safetensors"))
    assert (tmp_path / "imp" / "model.safetensors").is_file()


def test_open_clip_vision_tower_alone_safetensors(tmp_path):
    case = next(c for c in CASES if c.id == "open_clip_vit")
    src = case.make(tmp_path)
    model, _ = pruned(src, seed=1)
    tower = {k.removeprefix("visual."): v for k, v in model.state_dict().items() if k.startswith("visual.")}
    res = import_checkpoint(src.spec, save_st(tower, tmp_path / "v.safetensors"), tmp_path / "imp")
    assert res["weights_scope"] == "visual"
    loaded = dgmr.load(tmp_path / "imp")  # the tower itself
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.visual(x), loaded(x))


# ---------------------------------------------------------------------------------------
# (b) original EVA-CLIP naming of an open_clip timm tower
EVA_CLIP_RULES = [(r"^visual\.trunk\.", "visual."), (r"\.mlp\.fc1_g\.", ".mlp.w1."), (r"\.mlp\.fc1_x\.", ".mlp.w2."),
                  (r"\.mlp\.fc2\.", ".mlp.w3."), (r"\.mlp\.norm\.", ".mlp.ffn_ln."), (r"\.attn\.norm\.", ".attn.inner_attn_ln.")]


def eva_clip(tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Source, dict[str, torch.Tensor]]:
    _register_eva_trunk()
    register_open_clip(tmp_path, "dgmr-tiny-EVA-CLIP", TINY_EVA_CLIP)
    model, src = pruned(parse_spec("open_clip:dgmr-tiny-EVA-CLIP"), seed)
    assert {s.kind for s in family_of(model).mlps(model)} == {"swiglu_split"}
    sd = renamed(model.state_dict(), EVA_CLIP_RULES)
    assert "visual.blocks.0.mlp.w1.weight" in sd and "visual.blocks.1.mlp.ffn_ln.weight" in sd
    sd["visual.rope.freqs_cos"] = torch.zeros(4, 16)  # EVA-CLIP saves its rope tables; timm's filter drops them
    return model, src, sd


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_eva_clip_original_naming(fmt, tmp_path):
    model, src, sd = eva_clip(tmp_path)
    ckpt = save_pth(sd, tmp_path / "distill.pth", nest="state_dict") if fmt == "pth" else save_st(sd, tmp_path / "e.safetensors")
    res = import_checkpoint(src.spec, ckpt, tmp_path / "imp")
    assert res["weights_scope"] is None and len(res["hidden_after"]) == 2
    same_forward(model, tmp_path / "imp", 28)


def test_eva_clip_vision_tower_alone(tmp_path):
    model, src, sd = eva_clip(tmp_path, seed=2)
    tower = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    import_checkpoint(src.spec, save_pth(tower, tmp_path / "v.pth", nest="module"), tmp_path / "imp")
    loaded = dgmr.load(tmp_path / "imp")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.visual(x), loaded(x))


# ---------------------------------------------------------------------------------------
# (c) original DINOv2 naming of a timm DINOv2 SwiGLU ViT
DINOV2_RULES = [(r"\.mlp\.fc1\.", ".mlp.w12."), (r"\.mlp\.fc2\.", ".mlp.w3.")]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_dinov2_original_naming(fmt, tmp_path):
    model, src = pruned(parse_spec(*DINOV2))
    assert {s.kind for s in family_of(model).mlps(model)} == {"timm_glu_packed"}
    sd = renamed(model.state_dict(), DINOV2_RULES)
    if fmt == "pth":  # as DINOv2 saves it (with its mask token), DDP-wrapped, under "model"
        ckpt = save_pth({**sd, "mask_token": torch.zeros(1, 48)}, tmp_path / "d.pth", nest="model", prefix="module.")
    else:  # a pruned export without the mask token timm recognises DINOv2 by
        ckpt = save_st(sd, tmp_path / "d.safetensors")
    res = import_checkpoint(src.spec, ckpt, tmp_path / "imp", model_kwargs=src.kwargs)
    assert len(res["hidden_after"]) == 2
    same_forward(model, tmp_path / "imp", 28)


def test_dinov2_registers_tensors_the_filter_computes(tmp_path):
    """timm's filter computes cls_token and pos_embed of DINOv2 with registers from the original
    tensors: those are computed for real, the rest copied as renamed."""
    model, src = pruned(parse_spec("timm:vit_giant_patch14_reg4_dinov2", DINOV2[1]))
    sd = renamed(model.state_dict(), DINOV2_RULES)
    first = torch.randn(1, 1, 48)  # the original's class-token position embedding, folded in by the filter
    sd["pos_embed"] = torch.cat([first, sd["pos_embed"]], 1)
    sd["cls_token"] = sd["cls_token"] - first[:, 0:1]
    sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.zeros(1, 48)
    res = import_checkpoint(src.spec, save_st(sd, tmp_path / "r.safetensors"), tmp_path / "imp",
                            model_kwargs=src.kwargs)
    assert len(res["hidden_after"]) == 2
    # the reference: what timm's own loading does with these tensors (cls - first + first is
    # not cls bit for bit)
    from timm.models.vision_transformer import checkpoint_filter_fn

    model.load_state_dict(checkpoint_filter_fn(dict(sd), model))
    same_forward(model, tmp_path / "imp", 28)


# ---------------------------------------------------------------------------------------
# the imported directory is a dgmr directory like any other
def test_imported_dir_works_with_every_command(tmp_path, cli):
    src = parse_spec(TINY_VIT_SPEC, TINY_VIT_KWARGS)
    model, _ = pruned(src)
    ckpt = save_st(model.state_dict(), tmp_path / "vit.safetensors")
    kw = json.dumps(TINY_VIT_KWARGS)
    code, out, err = cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", kw, "--out", tmp_path / "imp",
                         "--dtype", "float32", "--json")
    assert code == 0, err
    same_forward(model, tmp_path / "imp", 32)
    code, out, err = cli("stats", tmp_path / "imp", "--json")
    assert code == 0, err
    assert json.loads(out)["params_after"] == sum(p.numel() for p in model.parameters())
    code, out, err = cli("prune", tmp_path / "imp", "--hidden", "8", "--out", tmp_path / "again", "--json")
    assert code == 0, err
    assert json.loads(out)["hidden_after"] == [8]
    assert dgmr.load(tmp_path / "again").blocks[0].mlp.fc1.out_features == 8
    image_folder(tmp_path / "img", ["a", "b"], 4, style="noise", size=(32, 32))
    code, out, err = cli("distill", "--teacher", TINY_VIT_SPEC, "--random-init", "--model-kwargs", kw,
                         "--student", tmp_path / "imp", "--data", tmp_path / "img", "--out", tmp_path / "dist",
                         "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--json",
                         "--device", "cpu")
    assert code == 0, err
    assert dgmr.load(tmp_path / "dist").blocks[1].mlp.fc1.out_features == model.blocks[1].mlp.fc1.out_features
    code, out, err = cli("eval", "knn", tmp_path / "imp", "--train", tmp_path / "img", "--val", tmp_path / "img",
                         "--k", "1", "--no-cache", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["per_k"]["1"]["top1"] == 1.0  # every image is its own nearest neighbour
    code, out, err = cli("eval", "speed", TINY_VIT_SPEC, tmp_path / "imp", "--random-init", "--model-kwargs", kw,
                         "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["models"][str(tmp_path / "imp")]["params"] == sum(p.numel() for p in model.parameters())
    # an existing output is kept unless --overwrite
    code, out, err = cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", kw, "--out", tmp_path / "imp")
    assert code == 2 and "--overwrite" in err
    code, out, err = cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", kw, "--out", tmp_path / "imp", "--overwrite")
    assert code == 0, err


# ---------------------------------------------------------------------------------------
# refusals: one line, nothing written
def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dgmr: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def _write_marker(path: str) -> None:  # what unpickling the evil checkpoint would call
    Path(path).write_text("executed")


class Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, cli):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2), "x": Evil(marker)}}, ckpt)
    code, out, err = cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", json.dumps(TINY_VIT_KWARGS),
                         "--out", tmp_path / "imp")
    _one_line_error(code, err, "not a plain state dict", "_write_marker")
    assert "weights_only=False" not in err
    assert not marker.exists() and not (tmp_path / "imp").exists()


def test_gate_and_up_widths_disagree(tmp_path, cli):
    model, src, sd = eva_clip(tmp_path)
    sd["visual.blocks.1.mlp.w1.weight"] = sd["visual.blocks.1.mlp.w1.weight"][:-1]
    ckpt = save_st(sd, tmp_path / "e.safetensors")
    code, out, err = cli("import", src.spec, ckpt, "--out", tmp_path / "imp")
    _one_line_error(code, err, "'visual.blocks.1.mlp.w1.weight'", "gate projection")
    assert not (tmp_path / "imp").exists()


def test_down_disagrees_with_up(tmp_path, cli):
    case = next(c for c in CASES if c.id == "open_clip_vit")
    src = case.make(tmp_path)
    model, _ = pruned(src)
    sd = model.state_dict()
    name = "visual.transformer.resblocks.0.mlp.c_proj.weight"
    sd[name] = sd[name][:, :-2]
    code, out, err = cli("import", src.spec, save_pth(sd, tmp_path / "x.pt"), "--out", tmp_path / "imp")
    _one_line_error(code, err, repr(name), "down projection")
    assert not (tmp_path / "imp").exists()


def test_odd_packed_rows_and_wrong_shapes_name_the_tensor(tmp_path, cli):
    model, src = pruned(parse_spec(*DINOV2))
    sd = renamed(model.state_dict(), DINOV2_RULES)
    kw = json.dumps(src.kwargs)
    bad = dict(sd, **{"blocks.0.mlp.w12.weight": sd["blocks.0.mlp.w12.weight"][:-1]})
    code, out, err = cli("import", src.spec, save_st(bad, tmp_path / "a.safetensors"), "--model-kwargs", kw,
                         "--out", tmp_path / "imp")
    _one_line_error(code, err, "'blocks.0.mlp.w12.weight'", "even")
    # a non-MLP tensor of the wrong shape: the architecture check names it
    bad = dict(sd, **{"blocks.0.attn.proj.weight": torch.zeros(48, 40)})
    code, out, err = cli("import", src.spec, save_st(bad, tmp_path / "b.safetensors"), "--model-kwargs", kw,
                         "--out", tmp_path / "imp")
    _one_line_error(code, err, "'blocks.0.attn.proj.weight'", "wrong shape", "CHECKPOINT")
    assert not (tmp_path / "imp").exists()


def test_hf_uniform_width_writes_the_transformers_layout(tmp_path):
    import transformers

    case = next(c for c in CASES if c.id == "hf_clip")
    model, src = build(case, tmp_path)
    dgmr.prune(model, hidden=40, progress=False)
    res = import_checkpoint(src, save_st(model.state_dict(), tmp_path / "c.safetensors"), tmp_path / "imp")
    assert res["hidden_after"] == [40] and "from_pretrained" in res["native_export"]
    same_forward(model, tmp_path / "imp", case.image_size)
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "imp")
    assert hf.config.vision_config.intermediate_size == 40


def test_pth_tar_names_and_corrupt_pickles(tmp_path, cli):
    """Releases name torch files *.pth.tar: read by their content. A corrupt file is reported as
    corrupt, not as a pickle that would run code."""
    src = parse_spec(TINY_VIT_SPEC, TINY_VIT_KWARGS)
    model, _ = pruned(src)
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save(model.state_dict(), ckpt)
    kw = json.dumps(TINY_VIT_KWARGS)
    code, out, err = cli("import", TINY_VIT_SPEC, ckpt, "--model-kwargs", kw, "--out", tmp_path / "imp", "--json")
    assert code == 0, err
    same_forward(model, tmp_path / "imp", 32)
    bad = tmp_path / "broken.pth"
    bad.write_bytes(ckpt.read_bytes()[:200])
    code, out, err = cli("import", TINY_VIT_SPEC, bad, "--model-kwargs", kw, "--out", tmp_path / "x")
    _one_line_error(code, err, "corrupt or not a torch file")
    assert "run code" not in err and not (tmp_path / "x").exists()


def test_garbage_pickle_is_corrupt_not_code(tmp_path, cli):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"\x80\x02 this is no pickle at all")
    code, out, err = cli("import", TINY_VIT_SPEC, bad, "--model-kwargs", json.dumps(TINY_VIT_KWARGS),
                         "--out", tmp_path / "x")
    _one_line_error(code, err, "corrupt or not a torch file")
    assert "run code" not in err and not (tmp_path / "x").exists()


def test_spec_that_is_a_directory_is_refused(tmp_path, cli):
    """SPEC is the original architecture; a directory (say, a dgmr directory given by mistake) is not one."""
    ckpt = tmp_path / "c.safetensors"
    save_st({"w": torch.zeros(2)}, ckpt)
    (tmp_path / "a_dir").mkdir()
    code, out, err = cli("import", tmp_path / "a_dir", ckpt, "--out", tmp_path / "imp")
    _one_line_error(code, err, "SPEC must name an architecture (timm:NAME, open_clip:ARCH, hf:DIR)",
                    f"not the directory {tmp_path / 'a_dir'}")
    assert not (tmp_path / "imp").exists()
