"""Outputs are model repositories of their own library (issue 22): loaded by the library alone,
a model card in each, dgmr's record in dgmr.json, the old layout still readable, inputs in
those layouts accepted as sources, the preprocessing saved with the model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dgmr
from dgmr.models.artifact import read_config
from dgmr.models.sources import build_model, parse_spec

from helpers import TINY_VIT_ARGV
from tiny_models import CASES, build

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
FIXTURES = Path(__file__).parent / "fixtures"


def _front_matter(card: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.to_dict()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A pruned tiny model of each library, saved by dgmr.save, with its input and dgmr.load's output."""
    root = tmp_path_factory.mktemp("repos")
    (root / "src").mkdir()
    made = {}
    for cid in ("timm_vit", "open_clip_vit", "hf_clip", "hf_siglip_vision"):
        case = next(c for c in CASES if c.id == cid)
        model, src = build(case, root / "src")
        model, rec = dgmr.prune(model, mlp_ratio=1.0, progress=False, source=src)
        out = root / cid
        dgmr.save(model, out, source=src, record=rec)
        x = torch.randn(2, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(3))
        again = dgmr.load(out)
        with torch.no_grad():
            fam = dgmr.family_of(again)
            y = fam.features(again, x)["pooled"]
        torch.save({"x": x, "y": y}, out.parent / f"{cid}.pt")
        made[cid] = out
    return made


# the library's own loaders, in a process that never imports dgmr: the recorded load lines, run as printed
_NO_DGMR = r'''
import json, sys, torch
from pathlib import Path
root = Path(sys.argv[1])
assert "dgmr" not in sys.modules
res = {}
for cid in ("timm_vit", "open_clip_vit", "hf_clip", "hf_siglip_vision"):
    d = root / cid
    note = json.loads((d / "dgmr.json").read_text())["native_export"]
    x = torch.load(root / f"{cid}.pt")["x"]
    scope = {}
    exec("import timm, open_clip, transformers", scope)
    m = eval(note["load"].replace("DIR", str(d)), scope)
    if isinstance(m, tuple):  # open_clip.create_model_and_transforms: (model, train transform, eval transform)
        m = m[0]
    m.eval()
    with torch.no_grad():
        if cid.startswith("timm"):
            y = m.forward_head(m.forward_features(x), pre_logits=True)
        elif cid.startswith("open_clip"):
            y = m.encode_image(x)
        else:
            vision = getattr(m, "vision_model", m)
            y = vision(pixel_values=x).pooler_output
    res[cid] = y
    if cid.startswith("hf"):
        proc = eval(note["processor"].replace("DIR", str(d)), scope)
        from PIL import Image
        img = Image.new("RGB", (50, 40), (10, 200, 30))
        pix = proc(images=img, return_tensors="pt")["pixel_values"]
        assert pix.shape[-1] == x.shape[-1], pix.shape
        if cid == "hf_siglip_vision":
            pipe = scope["transformers"].pipeline("image-feature-extraction", model=str(d))
            feats = torch.tensor(pipe(img))
            assert feats.ndim >= 2 and torch.isfinite(feats).all()
assert "dgmr" not in sys.modules
torch.save(res, root / "native.pt")
'''


@pytest.mark.smoke
def test_library_loaders_open_outputs_without_dgmr(outputs, tmp_path):
    """The recorded load line of each library, run in a process without dgmr on its path, gives
    the model dgmr.load gives; transformers' image processor and pipeline work on the folder."""
    root = outputs["timm_vit"].parent
    script = tmp_path / "native.py"
    script.write_text(_NO_DGMR)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(script), str(root)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    native = torch.load(root / "native.pt")
    for cid in outputs:
        want = torch.load(root / f"{cid}.pt")["y"]
        torch.testing.assert_close(native[cid], want, rtol=1e-5, atol=1e-5, msg=cid)


@pytest.mark.smoke
def test_every_output_has_a_card_and_a_record(outputs):
    expect = {"timm_vit": ("timm", "image-classification"), "open_clip_vit": ("open_clip", "zero-shot-image-classification"),
              "hf_clip": ("transformers", "zero-shot-image-classification"),
              "hf_siglip_vision": ("transformers", "image-feature-extraction")}
    for cid, out in outputs.items():
        meta = _front_matter(out / "README.md")
        assert (meta["library_name"], meta["pipeline_tag"]) == expect[cid]
        assert {"dgmr", "pruned"} <= set(meta["tags"])
        text = (out / "README.md").read_text()
        assert "## How to load" in text and "dgmr.load" in text and "-> " in text
        assert read_config(out)["format"] == "dgmr"
        assert not (out / "hf").exists()
        files = sorted(p.name for p in out.iterdir())
        assert files.count("model.safetensors") == 1 and "dgmr.json" in files


def test_card_says_why_the_library_cannot_load(tmp_path, cfgdir):
    """Per-layer widths: timm has no config for them; the card says so, dgmr.load still works."""
    case = next(c for c in CASES if c.id == "timm_vit")
    model, src = build(case, cfgdir)
    model, rec = dgmr.prune(model, widths={"blocks.0.mlp": 8, "blocks.1.mlp": 24}, progress=False, source=src)
    dgmr.save(model, tmp_path / "p", source=src, record=rec)
    text = (tmp_path / "p" / "README.md").read_text()
    assert "The timm loader cannot load this model" in text and "per-layer MLP widths" in text
    assert not (tmp_path / "p" / "config.json").exists()
    assert [m.mlp.fc1.out_features for m in dgmr.load(tmp_path / "p").blocks] == [8, 24]


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


@pytest.mark.smoke
def test_old_layout_still_loads():
    """Directories dgmr wrote before (record in config.json; streamed transformers shards in hf/)."""
    want = load_file(str(FIXTURES / "old_layout_outputs.safetensors"))
    timm_model = dgmr.load(FIXTURES / "old_layout_timm")
    hf_model = dgmr.load(FIXTURES / "old_layout_hf_stream")
    with torch.no_grad():
        torch.testing.assert_close(timm_model(want["timm_x"]), want["timm_y"])
        torch.testing.assert_close(hf_model(pixel_values=want["hf_x"]).last_hidden_state, want["hf_y"])
    assert read_config(FIXTURES / "old_layout_timm")["widths"] == {"blocks.0.mlp": 16}


def test_a_resumed_run_an_older_dgmr_exported_leaves_no_old_layout_files(tmp_path):
    """A run whose student an older dgmr exported (its record in config.json, the kept indices
    and timm_config.json at the top, transformers files in hf/), resumed and exported again,
    is the library's folder again: the old files are gone, the new ones in place."""
    from dgmr.distill import distill
    from dgmr.models.artifact import legacy_leftovers

    from helpers import tiny_run_inputs

    inputs = tiny_run_inputs(tmp_path / "in", 4)
    run = tmp_path / "run"
    kw = dict(steps=2, batch_size=4, lr=1e-3, log_every=1, save_every=1, workers=0, progress=False, device="cpu",
              tensorboard=False)
    distill(str(inputs["teacher"]), str(inputs["student"]), str(inputs["images"]), run, **kw)
    for name in ("dgmr.json", "config.json", "README.md"):  # as the older dgmr left it: no current-layout export
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "dgmr")
    for name in ("config.json", "kept_indices.safetensors", "timm_config.json"):
        shutil.copyfile(FIXTURES / "old_layout_timm" / name, run / name)
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    assert sorted(p.name for p in legacy_leftovers(run)) == ["config.json", "hf", "kept_indices.safetensors",
                                                              "timm_config.json"]
    distill(None, None, None, run, resume=True, progress=False)
    assert legacy_leftovers(run) == []
    assert not any((run / n).exists() for n in ("hf", "kept_indices.safetensors", "timm_config.json"))
    assert read_config(run)["format"] == "dgmr" and (run / "dgmr" / "kept_indices.safetensors").is_file()
    assert json.loads((run / "config.json").read_text()).get("format") != "dgmr"  # timm's hub config now
    assert dgmr.load(run)(torch.randn(1, 3, 32, 32)).shape[0] == 1


def test_old_layout_card_and_eval_preprocess_warns(tmp_path, cli):
    """`dgmr card` renders a card for an old directory; dgmr eval warns that it saved no preprocessing."""
    from dgmr.evaluate.settings import FeatureSettings
    from dgmr.evaluate.tasks import eval_preprocess_of

    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "old_layout_timm", old)
    code, _, err = cli("card", old)
    assert code == 0, err
    assert _front_matter(old / "README.md")["library_name"] == "timm"
    net = dgmr.load(old)
    with pytest.warns(UserWarning, match="records no preprocessing"):
        pre = eval_preprocess_of(old, net, dgmr.family_of(net), None, read_config(old), FeatureSettings())
    assert pre.settings["library"] == "timm"


def test_weights_and_configs_share_one_mode_under_the_umask(tmp_path, cli):
    old = os.umask(0o027)
    try:
        code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", tmp_path / "p")
    finally:
        os.umask(old)
    assert code == 0, err
    files = [p for p in (tmp_path / "p").rglob("*") if p.is_file()]
    modes = {str(p.relative_to(tmp_path / "p")): p.stat().st_mode & 0o777 for p in files}
    assert set(modes.values()) == {0o640}, modes
    assert {"model.safetensors", "config.json", "dgmr.json", "README.md", "dgmr/kept_indices.safetensors"} <= set(modes)


@pytest.mark.smoke
def test_card_results_and_bad_input(tmp_path, cli):
    out = tmp_path / "p"
    assert cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", out)[0] == 0
    params = read_config(out)["vision_params"]
    good = tmp_path / "knn.json"
    good.write_text(json.dumps({"metric": "knn", "model": str(out), "top1": 0.75, "mean_per_class_recall": 0.7,
                                "dataset": "digits", "params": params}))
    code, stdout, err = cli("card", out, "--results", good, "--json")
    assert code == 0, err and json.loads(stdout)["results"] == 2
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    values = {(r.metric_name, r.metric_value, r.dataset_name) for r in card.data.eval_results}
    assert ("knn top-1", 0.75, "digits") in values and card.data.library_name == "timm"
    assert "## Evaluation" in card.text
    before = (out / "README.md").read_bytes()
    (tmp_path / "bad.json").write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"metric": "knn", "model": "runs/another-model", "top1": 0.1, "dataset": "digits"}))
    (tmp_path / "plain").mkdir()
    for argv, words in [((out, "--results", tmp_path / "bad.json"), "cannot read result file"),
                        ((out, "--results", other), "not of"),
                        ((tmp_path / "plain",), "not a dgmr model directory")]:
        code, _, err = cli("card", *argv)
        assert code == 2 and err.startswith("dgmr: error:") and words in err and err.count("\n") == 1, err
        assert (out / "README.md").read_bytes() == before


def test_library_folders_are_sources(tmp_path, cli, cfgdir):
    """timm:local-dir:DIR, open_clip:local-dir:DIR and hf:DIR open folders in the libraries'
    layouts (a dgmr output is one); the result rebuilds offline without the source folder."""
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "2", "--out", tmp_path / "a")
    assert code == 0, err
    bare = tmp_path / "timm-folder"  # timm's own layout: config.json + model.safetensors, no dgmr record
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "a" / name, bare / name)
    code, _, err = cli("prune", bare, "--mlp-ratio", "1", "--out", tmp_path / "b")
    assert code == 2 and f"timm:local-dir:{bare}" in err
    code, _, err = cli("prune", f"timm:local-dir:{bare}", "--mlp-ratio", "1", "--out", tmp_path / "b")
    assert code == 0, err
    first = dgmr.load(tmp_path / "a")
    shutil.rmtree(bare)  # the record holds the architecture: no need for the source folder
    second = dgmr.load(tmp_path / "b")
    assert [b.mlp.fc1.out_features for b in second.blocks] == [192, 192]
    assert [b.mlp.fc1.out_features for b in first.blocks] == [384, 384]
    import timm

    again = timm.create_model(f"local-dir:{tmp_path / 'b'}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), second(x))
    # open_clip and transformers folders
    for cid, spec in (("open_clip_vit", "open_clip:local-dir:{}"), ("hf_vit", "hf:{}")):
        case = next(c for c in CASES if c.id == cid)
        model, src = build(case, cfgdir)
        model, rec = dgmr.prune(model, mlp_ratio=2.0, progress=False, source=src)
        dgmr.save(model, tmp_path / cid, source=src, record=rec)
        code, _, err = cli("prune", spec.format(tmp_path / cid), "--mlp-ratio", "1", "--out", tmp_path / f"{cid}-1")
        assert code == 0, err
        assert set(read_config(tmp_path / f"{cid}-1")["widths"].values()) == {32}


def test_preprocessing_travels_with_the_model(tmp_path, cli):
    """dgmr eval reads the image processor saved in the directory, not the source folder's
    (which may move): here a processor whose mean and sizes are not the class defaults."""
    import transformers

    from dgmr.evaluate.settings import FeatureSettings
    from dgmr.evaluate.tasks import eval_preprocess_of

    src_dir = tmp_path / "clipv"
    transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8).save_pretrained(src_dir)
    transformers.CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"shortest_edge": 40},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(src_dir)
    out = tmp_path / "out"
    code, _, err = cli("prune", f"hf:{src_dir}", "--random-init", "--mlp-ratio", "1", "--out", out)
    assert code == 0, err
    shutil.move(src_dir, tmp_path / "moved")
    proc = json.loads((out / "preprocessor_config.json").read_text())
    assert proc["image_mean"] == [0.5] * 3 and proc["size"] == {"shortest_edge": 40}
    net, cfg = dgmr.load(out), read_config(out)
    pre = eval_preprocess_of(out, net, dgmr.family_of(net), parse_spec(f"hf:{src_dir}"), cfg, FeatureSettings())
    assert pre.settings["image_mean"] == [0.5] * 3 and pre.settings["size"] == {"shortest_edge": 40}
    # and on into what is saved from the loaded model (a prune of the pruned directory)
    code, _, err = cli("prune", out, "--mlp-ratio", "0.5", "--out", tmp_path / "again")
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3


def test_streamed_and_imported_outputs_are_library_repos(tmp_path):
    """A streaming prune and an import write the same layout: transformers' config beside the
    weights at the top, a card, dgmr.json."""
    import transformers
    from safetensors.torch import save_model

    from dgmr.prune.stream import stream_prune

    case = next(c for c in CASES if c.id == "hf_vit")
    (tmp_path / "cfg").mkdir()
    model, src = build(case, tmp_path / "cfg")
    save_model(model, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    stream_prune(src.spec, tmp_path / "w.safetensors", tmp_path / "s", mlp_ratio=1.0, progress=False)
    pruned, _ = dgmr.prune(build_model(src, pretrained=False), mlp_ratio=1.0, progress=False)
    save_model(pruned, str(tmp_path / "pruned.safetensors"), metadata={"format": "pt"})
    dgmr.import_checkpoint(src.spec, tmp_path / "pruned.safetensors", tmp_path / "i")
    x = torch.randn(1, 3, 32, 32)
    for d in ("s", "i"):
        out = tmp_path / d
        assert {"config.json", "model.safetensors", "dgmr.json", "README.md", "preprocessor_config.json"} <= \
            {p.name for p in out.iterdir()}
        assert _front_matter(out / "README.md")["library_name"] == "transformers"
        m = transformers.AutoModel.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(m(pixel_values=x).last_hidden_state,
                                       dgmr.load(out)(pixel_values=x).last_hidden_state)


def test_timm_config_keeps_only_architecture_arguments(tmp_path, cli):
    """create_model arguments that are not architecture (pretrained_cfg_overlay) stay out of
    timm's model_args: the printed load line and the folder load as they are."""
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "pretrained_cfg_overlay": {"mean": [0.5, 0.5, 0.5]}}
    code, out, err = cli("prune", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(kwargs),
                         "--mlp-ratio", "1", "--out", tmp_path / "p", "--json")
    assert code == 0, err
    assert json.loads(out)["native_export"] == "timm.create_model('local-dir:DIR', pretrained=True)"
    hub = json.loads((tmp_path / "p" / "config.json").read_text())
    assert "pretrained_cfg_overlay" not in hub["model_args"] and hub["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    import timm

    m = timm.create_model(f"local-dir:{tmp_path / 'p'}", pretrained=True)
    assert m.blocks[0].mlp.fc1.out_features == 192 and tuple(m.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)


@pytest.mark.smoke
def test_head_cut_outputs_are_library_repos_where_the_config_can_say_it(tmp_path, cfgdir):
    """Cut heads: transformers ViT keeps a config (num_attention_heads + head_dim) that
    AutoModel reads from the top of the directory; timm's ViT cannot say them, and its card
    says why. Either card counts the cut heads in the params after."""
    import transformers

    for cid, native in (("hf_vit", True), ("timm_vit", False)):
        case = next(c for c in CASES if c.id == cid)
        model, src = build(case, cfgdir)
        model, rec = dgmr.prune(model, mlp_ratio=1.0, heads=1, progress=False, source=src)
        out = tmp_path / cid
        cfg = dgmr.save(model, out, source=src, record=rec)
        n = len(cfg["heads"])
        assert set(cfg["heads"].values()) == {1} and cfg["params_after"] == dgmr.family_of(model).vision_params(model)
        text = (out / "README.md").read_text()
        assert f"{n} of {n} attention layers cut, heads " in text and "-> 1" in text
        assert "attention heads" in text.split("**Pruned:**")[1].splitlines()[0]
        if native:
            assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 1
            m = transformers.AutoModel.from_pretrained(out).eval()
            x = torch.randn(1, 3, case.image_size, case.image_size)
            with torch.no_grad():
                torch.testing.assert_close(m(pixel_values=x).last_hidden_state,
                                           dgmr.load(out)(pixel_values=x).last_hidden_state)
        else:
            assert "The timm loader cannot load this model" in text and "head" in cfg["native_export"]["skipped"]
            assert not (out / "config.json").exists()
