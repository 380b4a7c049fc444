"""Every family adapter, on tiny random-init configs of the real classes."""
from __future__ import annotations

import json

import pytest
import torch

import dgmr
from dgmr.models import artifact
from dgmr.models.families import family_of
from dgmr.models.sites.mlp import in_dim, out_dim

from tiny_models import CASES, GenericNet, build, output

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


def _x(case, n=2):
    return torch.randn(n, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(1))


def _params_per_neuron(site) -> int:
    """Parameters that one hidden neuron owns, counted from the layer shapes."""
    rows = 2 if site.gated else 1
    n = rows * (in_dim(site.up) + (site.up.bias is not None))  # in_dim: Linear or 1x1 conv
    n += out_dim(site.down)
    for norm in site.norms:
        n += sum(p is not None for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)))
    return n


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_family_and_mlp_kinds(case, cfgdir):
    model, _ = build(case, cfgdir)
    fam = family_of(model)
    assert fam.name == case.family
    sites = fam.mlps(model)
    assert sites and {s.kind for s in sites} == set(case.kinds)
    # nothing outside the vision tower; pooling-head MLPs only where the library ties their
    # width to the blocks' (transformers SigLIP: one intermediate_size for both)
    names = [s.name for s in sites]
    assert not any("attn_pool" in n or "text" in n for n in names)
    assert any("head" in n for n in names) == (case.id == "hf_siglip_vision")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_full_width_reproduces_outputs(case, cfgdir):
    model, src = build(case, cfgdir)
    fam = family_of(model)
    x = _x(case)
    with torch.no_grad():
        y0 = output(fam, model, x)
        model, rec = dgmr.prune(model, keep_fraction=1.0, progress=False)
        y1 = output(fam, model, x)
    assert all(layer["hidden_after"] == layer["hidden_before"] for layer in rec.layers)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_prune_ratio_shapes_and_param_count(case, ratio, cfgdir):
    model, src = build(case, cfgdir)
    fam = family_of(model)
    x = _x(case)
    with torch.no_grad():
        shape0 = output(fam, model, x).shape
    sites = fam.mlps(model)
    n0 = sum(p.numel() for p in model.parameters())
    expected_cut = sum((s.hidden - round(ratio * s.in_features)) * _params_per_neuron(s) for s in sites)
    model, rec = dgmr.prune(model, mlp_ratio=ratio, progress=False, source=src)
    assert [layer["hidden_after"] for layer in rec.layers] == [round(ratio * s.in_features) for s in sites]
    assert sum(p.numel() for p in model.parameters()) == n0 - expected_cut
    with torch.no_grad():
        y = output(fam, model, x)
    assert y.shape == shape0 and torch.isfinite(y).all()
    # the kept indices are what the criterion picks from the original weights
    for layer in rec.layers:
        assert layer["kept"].numel() == layer["hidden_after"]
        assert torch.equal(layer["kept"], torch.sort(layer["kept"]).values)


def _image(case):
    from PIL import Image

    return Image.new("RGB", (2 * case.image_size, 2 * case.image_size), (120, 30, 200))


def _native(case, out, cfg, model, x):
    """(reloaded output, original output) through the source library's own loader."""
    fam = family_of(model)
    note = cfg["native_export"]
    if case.family == "generic":
        assert "skipped" in note
        return None
    if not case.native:
        assert "takes no mlp_ratio" in note["skipped"], note
        return None
    assert "skipped" not in note, note
    if case.family == "timm":
        import timm

        assert note["load"] == "timm.create_model('local-dir:DIR', pretrained=True)"
        m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        return m(x), model(x)
    if case.family == "open_clip" and case.id == "open_clip_timm_tower":
        import timm

        assert sorted(p.name for p in (out / "timm_trunk").iterdir()) == ["timm_config.json"]  # weights stored once
        scope = {}
        exec("import timm\n" + note["load"].replace("DIR", str(out)), scope)  # the recorded line, as printed
        return scope["trunk"].eval()(x), model.visual.trunk(x)
    if case.family == "open_clip":
        import open_clip

        m, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        return m.eval().encode_image(x), model.encode_image(x)
    if case.family == "hf":
        import transformers

        m = transformers.AutoModel.from_pretrained(out).eval()
        assert type(m).__name__ == cfg["class"]
        proc = transformers.AutoImageProcessor.from_pretrained(out)
        pixels = proc(images=_image(case), return_tensors="pt")["pixel_values"]
        assert torch.isfinite(output(fam, m, pixels)).all()  # the saved processor feeds the model what it takes
        return output(fam, m, x), output(fam, model, x)
    raise AssertionError(case.family)


@pytest.mark.smoke
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_export_reload_identical(case, cfgdir, tmp_path):
    model, src = build(case, cfgdir)
    fam = family_of(model)
    # HF Dinov2Config.mlp_ratio is an int: its SwiGLU width int(int(d*r)*2/3) rounded up to 8 is 64 at r=3
    width = dict(hidden=64) if case.id == "hf_dinov2_swiglu" else dict(mlp_ratio=1.0)
    model, rec = dgmr.prune(model, **width, progress=False, source=src)
    out = tmp_path / "pruned"
    cfg = dgmr.save(model, out, source=src, record=rec)
    assert (out / "model.safetensors").is_file() and (out / "dgmr.json").is_file() and (out / "README.md").is_file()
    assert cfg["format"] == "dgmr" and cfg["family"] == case.family
    assert json.loads((out / "dgmr.json").read_text())["widths"] == rec.widths
    # weights once: no other tensor file anywhere in the directory
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["kept_indices.safetensors", "model.safetensors"]
    # and one at the top: timm's local-dir loader (<= 1.0.25 at least) fails on two
    assert cfg["widths"] == rec.widths
    x = _x(case)
    with torch.no_grad():
        y = output(fam, model, x)
        again = dgmr.load(out, model=GenericNet() if src is None else None)
        torch.testing.assert_close(output(fam, again, x), y, rtol=0, atol=0)
        pair = _native(case, out, cfg, model, x)
    if pair is not None:
        torch.testing.assert_close(pair[0], pair[1], rtol=0, atol=0)
    kept = artifact.load_kept_indices(out)
    assert set(kept) == set(rec.widths) and all(torch.equal(kept[k], rec.kept[k]) for k in kept)


@pytest.mark.parametrize("case", [c for c in CASES if c.family != "generic"], ids=lambda c: c.id)
def test_load_builds_parameters_on_meta_and_buffers_for_real(case, cfgdir):
    """dgmr.load never random-initialises: the architecture comes with parameters on meta
    (filled from the checkpoint by assignment) and real non-persistent buffers, but for those
    a module builds from a parameter's device (Swin's shifted-window attn_mask), which it
    computes again once the weights are in (timm's init_non_persistent_buffers)."""
    _, src = build(case, cfgdir)
    empty = artifact._build_empty(src)
    assert empty is not None
    assert all(p.is_meta for p in empty.parameters())
    for m in empty.modules():
        if any(b.is_meta for b in m.buffers(recurse=False)):
            assert callable(getattr(m, "init_non_persistent_buffers", None)), type(m).__name__


def test_hf_dinov2_swiglu_refuses_unexpressible_width(cfgdir, tmp_path):
    case = next(c for c in CASES if c.id == "hf_dinov2_swiglu")
    model, src = build(case, cfgdir)
    model, rec = dgmr.prune(model, mlp_ratio=1.0, progress=False, source=src)  # width 32: no int mlp_ratio gives it
    cfg = dgmr.save(model, tmp_path / "p", source=src, record=rec)
    assert "mlp_ratio" in cfg["native_export"]["skipped"] and not (tmp_path / "p" / "config.json").exists()
    assert (tmp_path / "p" / "preprocessor_config.json").is_file()  # the processor does not depend on the widths
    again = dgmr.load(tmp_path / "p")  # the dgmr artifact still round-trips
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state)


# -- 1x1-conv MLPs: hidden norms, meta shapes, the CLI --------------------------------------
def _conv_mlp(norm_layer, h=32, d=8, seed=0):
    """timm ConvMlp (fc1 1x1 conv, norm over the hidden channels, act, fc2 1x1 conv), with
    random norm affine parameters and running stats so that slicing them is visible."""
    from timm.layers import ConvMlp

    torch.manual_seed(seed)
    m = ConvMlp(d, h, norm_layer=norm_layer).eval()
    with torch.no_grad():
        for t in [*m.norm.parameters(), *(b for b in m.norm.buffers() if b.ndim)]:
            t.copy_(torch.rand_like(t) + 0.5)
    return m


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_conv_mlp_cut_equals_dropping_hidden_channels(norm):
    """With a per-channel norm in eval mode (BatchNorm; GroupNorm with one channel per group),
    the cut MLP computes exactly what the original computes with the dropped channels zeroed
    before fc2: the kept rows, norm entries and fc2 columns are the original values."""
    from dgmr.models.sites.mlp import find_mlps, shrink_mlp

    h = 32
    make = torch.nn.BatchNorm2d if norm == "batchnorm" else (lambda c, **kw: torch.nn.GroupNorm(c, c, **kw))
    ref, m = _conv_mlp(make, h), _conv_mlp(make, h)
    (site,) = find_mlps(m)
    assert site.kind == "conv1x1" and site.norms == [m.norm] and (site.in_features, site.hidden) == (8, h)
    w1, w_gate = site.scoring_weights()
    assert w1.shape == (h, 8) and w_gate is None
    keep = torch.tensor([1, 4, 5, 9, 20, 31])
    mask = torch.zeros(1, h, 1, 1)
    mask[:, keep] = 1
    ref.fc2.register_forward_pre_hook(lambda mod, args: (args[0] * mask,))
    with torch.no_grad():
        shrink_mlp(site, keep)
        x = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(m(x), ref(x))
    assert (m.fc1.out_channels, m.fc2.in_channels) == (6, 6)
    if norm == "batchnorm":
        assert m.norm.num_features == 6 and torch.equal(m.norm.running_var, ref.norm.running_var[keep])
    else:
        assert m.norm.num_channels == m.norm.num_groups == 6  # one group per channel stays so


def test_group_norm_refuses_a_width_its_groups_do_not_divide():
    from dgmr.models.sites.mlp import find_mlps, shrink_mlp

    m = _conv_mlp(lambda c, **kw: torch.nn.GroupNorm(4, c, **kw), h=32)
    (site,) = find_mlps(m)
    with pytest.raises(dgmr.DgmrError, match=r"4 groups.*divide 10"):
        shrink_mlp(site, torch.arange(10))
    assert m.fc1.out_channels == 32 and m.norm.weight.shape == (32,)  # refused before any cut
    shrink_mlp(site, torch.arange(0, 32, 2))  # 16 = 4 groups of 4
    assert m.norm.num_channels == 16 and m(torch.randn(1, 8, 3, 3)).shape == (1, 8, 3, 3)


def test_a_width_refused_at_a_later_mlp_leaves_the_whole_model_uncut():
    """dgmr.prune checks every MLP's width before it cuts the first one."""
    model = torch.nn.Sequential(_conv_mlp(torch.nn.BatchNorm2d, h=32),
                                _conv_mlp(lambda c, **kw: torch.nn.GroupNorm(4, c, **kw), h=32))
    with pytest.raises(dgmr.DgmrError, match=r"4 groups.*divide 10"):
        dgmr.prune(model, hidden=10, progress=False)
    assert [m.fc1.out_channels for m in model] == [32, 32] and model[0].norm.num_features == 32


def test_squeeze_excitation_is_not_an_mlp():
    """timm's SE modules have fc1/fc2 1x1 convs like a conv MLP, but gate their input: never pruned."""
    from timm.layers import SEModule

    model = torch.nn.Sequential(_conv_mlp(torch.nn.BatchNorm2d, h=32), SEModule(8, rd_ratio=0.5, rd_divisor=1))
    sites = dgmr.family_of(model).mlps(model)
    assert [s.name for s in sites] == ["0"] and sites[0].kind == "conv1x1"
    dgmr.prune(model, keep_fraction=0.5, progress=False)
    assert model[0].fc1.out_channels == 16 and model[1].fc1.out_channels == 4  # SE bottleneck untouched


def test_conv_mlp_norm_over_more_than_the_channels_is_refused():
    from dgmr.models.sites.mlp import find_mlps

    m = _conv_mlp(None)
    m.norm = torch.nn.LayerNorm((32, 4, 4))  # not a per-channel norm: slicing it means nothing
    with pytest.raises(dgmr.DgmrError, match=r"norm: LayerNorm over the hidden dim is not a per-channel norm"):
        find_mlps(m)


def test_conv_mlp_shrinks_on_meta():
    """dgmr.load and dgmr stats rebuild shapes on meta: conv weights and BatchNorm buffers included."""
    from timm.layers import ConvMlp

    from dgmr.models.sites.mlp import find_mlps, shrink_mlp

    with torch.device("meta"):
        m = ConvMlp(8, 32, norm_layer=torch.nn.BatchNorm2d)
    (site,) = find_mlps(m)
    shrink_mlp(site, torch.arange(12))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["fc1.weight"] == (12, 8, 1, 1) and shapes["fc1.bias"] == (12,)
    assert shapes["fc2.weight"] == (8, 12, 1, 1) and shapes["norm.running_mean"] == (12,)
    assert all(v.is_meta for v in m.state_dict().values())


def test_cli_prunes_convnext_with_conv_mlp(cli, tmp_path):
    """`dgmr prune timm:convnext_atto` (conv_mlp=True: 1x1-conv MLPs), then dgmr.load and a forward."""
    out = tmp_path / "cnx"
    kwargs = json.dumps({"depths": [1, 1, 1, 1]})  # the real atto widths (40/80/160/320), fewer blocks
    code, stdout, err = cli("prune", "timm:convnext_atto", "--random-init", "--mlp-ratio", "1",
                            "--model-kwargs", kwargs, "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["hidden_after"] == [40, 80, 160, 320]
    cfg = json.loads((out / "dgmr.json").read_text())
    assert "takes no mlp_ratio" in cfg["native_export"]["skipped"]  # timm's ConvNeXt has no such argument
    model = dgmr.load(out)
    assert [m.fc1.out_channels for m in (model.stages[i].blocks[0].mlp for i in range(4))] == [40, 80, 160, 320]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    code, stdout, err = cli("stats", "timm:convnext_atto", "--model-kwargs", kwargs, "--mlp-ratio", "1", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert 0 < s["param_reduction"] < 1 and 0 < s["flop_reduction"] < 1


@pytest.mark.parametrize("case", [c for c in CASES if "convnext" in c.id or "poolformer" in c.id or c.id == "timm_swin"],
                         ids=lambda c: c.id)
def test_timm_4d_features_are_tokens_by_channels(case, cfgdir):
    """ConvNeXt/MetaFormer features are NCHW, Swin's NHWC: both come out as (B, H*W, C) tokens."""
    model, _ = build(case, cfgdir)
    fam = family_of(model)
    x = _x(case)
    with torch.no_grad():
        f = fam.features(model, x)
        maps = model.forward_features(x)
    c = model.num_features
    assert f["pooled"].shape == (2, c) and f["tokens"].shape[0] == 2 and f["tokens"].shape[2] == c
    if case.id != "timm_swin":
        torch.testing.assert_close(f["tokens"], maps.flatten(2).transpose(1, 2))


def test_open_clip_export_skipped_when_create_model_kwargs_change_the_model(cfgdir, tmp_path):
    """open_clip's local-dir config cannot hold create_model kwargs such as force_quick_gelu: an
    export without them would compute something else, so it is skipped and dgmr.load is exact."""
    from dgmr.models.sources import build_model

    case = next(c for c in CASES if c.id == "open_clip_vit")
    src = build(case, cfgdir)[1]
    src.kwargs = {"force_quick_gelu": True}
    model = build_model(src, pretrained=False)
    model, rec = dgmr.prune(model, mlp_ratio=1.0, progress=False, source=src)
    cfg = dgmr.save(model, tmp_path / "p", source=src, record=rec)
    assert "force_quick_gelu" in cfg["native_export"]["skipped"]
    assert not (tmp_path / "p" / "open_clip_config.json").exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dgmr.load(tmp_path / "p").encode_image(x), model.encode_image(x), rtol=0, atol=0)
