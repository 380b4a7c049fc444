"""Evaluation numbers comparable with clip_benchmark: the model's own preprocessing (against
the libraries' own transforms), mean per-class recall and top-5, retrieval tie rules
(against hand-computed values and clip_benchmark's topk recall re-derived here), the
clip_benchmark linear-probe recipe, result files clip_benchmark can table and clip_benchmark
files dgmr report can read, {c} templates and per-dataset JSON files. clip_benchmark itself is
not installed: its published behaviour is re-derived in the tests where needed."""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dgmr.core.errors import DgmrError
from dgmr.evaluate import (classification_metrics, clip_benchmark_probe, eval_knn, eval_zeroshot, linear_probe,
                           retrieval_recall, save_result, zeroshot_classify)
from dgmr.report import render_report
from dgmr.models.transforms import crop_transform
from dgmr.evaluate.linear_cb import GRID
from dgmr.models.preprocess import eval_transform, resolve_eval_preprocess
from dgmr.models.sources import Source, build_model

from helpers import TINY_VIT_ARGV, image_folder
from tiny_models import TINY_OPEN_CLIP, register_open_clip

pytestmark = pytest.mark.usefixtures("one_thread")
COLORS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30), "yellow": (230, 220, 30)}


def _images() -> list[Image.Image]:
    """Non-square noise images (wide and tall): where resize modes and interpolations differ."""
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in ((53, 37), (29, 61), (40, 40))]


def _same_pixels(ours, theirs) -> None:
    for im in _images():
        a, b = ours(im), theirs(im)
        assert a.shape == b.shape and torch.equal(a, b)


# -- preprocessing: the libraries' own transforms ------------------------------------------
@pytest.mark.parametrize("overlay", [None, dict(interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
                                                mean=(0.5,) * 3, std=(0.5,) * 3)], ids=["default", "siglip_style"])
def test_timm_transform_is_timms_own(overlay):
    import timm
    import timm.data

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1,
                          **({"pretrained_cfg_overlay": overlay} if overlay else {}))
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    _same_pixels(eval_transform(m), theirs)
    settings = resolve_eval_preprocess(m).settings
    assert settings["library"] == "timm" and settings["crop_mode"] == (overlay or {}).get("crop_mode", "center")


@pytest.mark.parametrize("resize_mode,interp", [("shortest", "bicubic"), ("squash", "bilinear")])
def test_open_clip_transform_is_open_clips_own(tmp_path, resize_mode, interp):
    import open_clip

    register_open_clip(tmp_path, "dgmr-tiny-ViT", TINY_OPEN_CLIP)
    model, _, theirs = open_clip.create_model_and_transforms(
        "dgmr-tiny-ViT", image_resize_mode=resize_mode, image_interpolation=interp, image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3)
    _same_pixels(eval_transform(model), theirs)
    pp = resolve_eval_preprocess(model).settings
    assert (pp["resize_mode"], pp["interpolation"], pp["mean"]) == (resize_mode, interp, [0.5] * 3)


def test_open_clip_random_init_takes_the_tags_preprocessing(tmp_path):
    """A random-init (or dgmr-loaded) model was built without the tag; its preprocessing comes
    from open_clip's offline tag metadata: SigLIP's squash resize and 0.5 mean/std."""
    import open_clip

    register_open_clip(tmp_path, "dgmr-tiny-ViT", TINY_OPEN_CLIP)
    model = build_model(Source("open_clip", "dgmr-tiny-ViT"), pretrained=False)
    tag = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    assert tag.get("resize_mode") == "squash"
    _, _, theirs = open_clip.create_model_and_transforms(
        "dgmr-tiny-ViT", image_resize_mode=tag["resize_mode"], image_interpolation=tag.get("interpolation"),
        image_mean=tag["mean"], image_std=tag["std"])
    ours = eval_transform(model, source=Source("open_clip", "ViT-B-16-SigLIP", "webli"))
    _same_pixels(ours, theirs)
    without_tag = eval_transform(model)
    assert not torch.equal(ours(_images()[0]), without_tag(_images()[0]))  # the tag's config changed something


def test_hf_transform_is_the_image_processors():
    import transformers

    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                        patch_size=8, intermediate_size=64)
    model = transformers.CLIPVisionModel(cfg)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    _same_pixels(eval_transform(model), lambda im: proc(images=im, return_tensors="pt")["pixel_values"][0])


def test_hf_processor_saved_beside_the_model_wins(tmp_path):
    import transformers

    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                        patch_size=8, intermediate_size=64)
    cfg.save_pretrained(tmp_path / "m")
    saved = transformers.CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                                            image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5])
    saved.save_pretrained(tmp_path / "m")
    src = Source("hf", str(tmp_path / "m"))
    model = build_model(src, pretrained=False)
    pre = resolve_eval_preprocess(model, source=src)
    assert pre.settings["image_mean"] == [0.1, 0.2, 0.3]
    _same_pixels(pre.transform, lambda im: saved(images=im, return_tensors="pt")["pixel_values"][0])


@pytest.mark.parametrize("case_id", ["timm_swin", "timm_convnext_conv_mlp", "open_clip_vit", "hf_dinov2",
                                     "hf_siglip_vision", "generic"])
def test_every_family_transform_feeds_its_model(case_id, tmp_path):
    from tiny_models import CASES, build

    from dgmr.models.families import family_of

    model, src = build(next(c for c in CASES if c.id == case_id), tmp_path)
    family = family_of(model)
    x = torch.stack([eval_transform(model, family, source=src)(im) for im in _images()])
    # DINOv2 takes any size (its config's image_size is the training size): the published 224 crop
    want = 224 if case_id.startswith("hf_dinov2") else family.data_config(model)["image_size"]
    assert x.shape[-1] == x.shape[-2] == want
    with torch.no_grad():
        assert torch.isfinite(family.features(model, x)["pooled"]).all()


def test_crop_option_is_the_fixed_256_224_crop():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    pre = resolve_eval_preprocess(m, crop=0.875)
    assert pre.settings["resize"] == 256 and pre.settings["crop"] == 224
    _same_pixels(pre.transform, crop_transform(224, (0.5,) * 3, (0.5,) * 3, 0.875))
    assert resolve_eval_preprocess(m).describe() != pre.describe()  # different cache keys


# -- classification metrics ---------------------------------------------------------------
def test_mean_per_class_recall_and_top5_hand_computed():
    labels = torch.tensor([0, 0, 0, 1])
    top = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]])
    m = classification_metrics(top, labels, num_classes=2)
    assert m["top1"] == 0.75 and m["top5"] is None  # 2 classes: no top-5
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1) / 2)
    top5 = torch.tensor([[5, 4, 3, 2, 0], [5, 4, 3, 2, 1], [0, 1, 2, 3, 4], [5, 4, 3, 2, 1]])
    m5 = classification_metrics(top5, labels, num_classes=6)
    assert m5["top1"] == 0.25 and m5["top5"] == 0.75 and m5["mean_per_class_recall"] == pytest.approx((1 / 3 + 0) / 2)


def test_zeroshot_and_linear_report_recall_and_null_top5():
    clf = torch.eye(3)
    feats = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0], [0, 0, 1.0]])  # class 1's image looks like class 0
    res = zeroshot_classify(feats, torch.tensor([0, 1, 2, 2]), clf)
    assert res["top1"] == 0.75 and res["top5"] is None and res["mean_per_class_recall"] == pytest.approx(2 / 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    x[:, :3] += 4 * torch.nn.functional.one_hot(y, 3)
    lin = linear_probe(x, y, x, y)
    assert lin["top5"] is None and lin["protocol"] == "lbfgs" and lin["mean_per_class_recall"] == pytest.approx(1.0)


# -- retrieval ties ------------------------------------------------------------------------
def test_all_tied_matrix_per_tie_rule():
    want = {"expected": 0.5, "optimistic": 1.0, "pessimistic": 0.0}
    for ties, r1 in want.items():
        res = retrieval_recall(torch.zeros(2, 2), [0, 1], (1, 2), ties=ties)
        assert res["image_to_text"]["R@1"] == r1 and res["text_to_image"]["R@1"] == r1
        assert res["image_to_text"]["R@2"] == 1.0 and res["ties"] == ties
    with pytest.raises(DgmrError, match="unknown tie rule"):
        retrieval_recall(torch.zeros(2, 2), [0, 1], ties="topk")


def _recall_over_orderings(sim: torch.Tensor, caption_image: list[int], k: int) -> float:
    """image->text recall@k averaged over every tie-breaking order of the captions (exact)."""
    n_img, n_txt = sim.shape
    total, count = 0.0, 0
    for perm in itertools.permutations(range(n_txt)):
        rank_of = torch.tensor(perm, dtype=torch.float64)
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda j: (-float(sim[i, j]), rank_of[j]))
            hits += any(caption_image[j] == i for j in order[:k])
        total += hits / n_img
        count += 1
    return total / count


def test_expected_recall_is_the_mean_over_tie_breaking_orders():
    sim = torch.tensor([[1.0, 1, 1, 1, 0.5], [0.0, 0, 2, 1, 2], [0.3, 0.3, 0.3, 0.9, 0.3]])
    caption_image = [0, 0, 1, 1, 2]
    res = retrieval_recall(sim, caption_image, (1, 2, 3, 4))
    prev = 0.0
    for k in (1, 2, 3, 4):
        got = res["image_to_text"][f"R@{k}"]
        assert got == pytest.approx(_recall_over_orderings(sim, caption_image, k), abs=1e-9)
        assert got >= prev  # monotonic in K
        prev = got
        lo = retrieval_recall(sim, caption_image, (k,), ties="pessimistic")["image_to_text"][f"R@{k}"]
        hi = retrieval_recall(sim, caption_image, (k,), ties="optimistic")["image_to_text"][f"R@{k}"]
        assert lo <= got <= hi
    assert res["image_to_text"]["R@1"] == pytest.approx((0.5 + 0.5 + 0) / 3)


def _clip_benchmark_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """clip_benchmark's recall@k as published: top-k by torch.topk, hit if a positive is among them."""
    top = scores.topk(k, dim=1).indices
    return float(positives.gather(1, top).any(1).float().mean())


def test_without_ties_every_rule_equals_clip_benchmarks_recall():
    g = torch.Generator().manual_seed(3)
    sim = torch.randn(7, 12, generator=g)
    caption_image = [j % 7 for j in range(12)]
    pos = torch.zeros(7, 12, dtype=torch.bool)
    pos[caption_image, torch.arange(12)] = True
    for ties in ("expected", "optimistic", "pessimistic"):
        res = retrieval_recall(sim, caption_image, (1, 3, 5), ties=ties)
        assert res["tied_queries"] == 0
        for k in (1, 3, 5):
            assert res["image_to_text"][f"R@{k}"] == pytest.approx(_clip_benchmark_recall(sim, pos, k))
            assert res["text_to_image"][f"R@{k}"] == pytest.approx(_clip_benchmark_recall(sim.T, pos.T, k))


# -- clip_benchmark's linear probe ---------------------------------------------------------
def test_clip_benchmark_probe_recipe():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=g) * 3
    ytr, yte = torch.arange(180) % 6, torch.arange(60) % 6
    xtr = centers[ytr] + torch.randn(180, 16, generator=g)
    xte = centers[yte] + torch.randn(60, 16, generator=g)
    res = clip_benchmark_probe(xtr, ytr, xte, yte, epochs=3)
    assert res["protocol"] == "clip_benchmark" and res["top1"] > 0.9 and res["top5"] is not None
    assert res["n_held_out"] == 36 and res["weight_decay"] in GRID and res["normalized"]
    tried = [float(k) for k in res["val_top1"]]
    first = [GRID[i] for i in range(0, 97, 16)]  # the 7-point first pass of logspace(-6, 2, 97)
    assert all(any(math.isclose(t, f, rel_tol=1e-5) for t in tried) for f in first)
    assert 7 <= len(tried) <= 7 + 8  # the refinement adds at most two new points per span (8, 4, 2, 1)
    again = clip_benchmark_probe(xtr, ytr, xte, yte, epochs=3)
    assert again["top1"] == res["top1"] and again["weight_decay"] == res["weight_decay"]  # seeded
    no_val = clip_benchmark_probe(xtr, ytr, xte, yte, epochs=3, val_fraction=0)
    assert no_val["weight_decay"] == 0 and no_val["val_top1"] == {} and no_val["n_held_out"] == 0


# -- result files --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cbdata")
    image_folder(root / "train", COLORS, 5, seed=0, size=(24, 20), jitter=25, disc=True)
    image_folder(root / "val", COLORS, 2, seed=1, size=(20, 26), jitter=25, disc=True)
    return root


def _clip_benchmark_build(paths: list[Path]) -> list[dict[str, str]]:
    """What ``clip_benchmark build`` does with result files (re-derived): metrics merged into
    the top level, model_fullname = model + ' ' + pretrained, one CSV."""
    rows, fields = [], set()
    for p in paths:
        d = json.loads(p.read_text())
        row = {**d["metrics"], **d}
        del row["metrics"]
        row["model_fullname"] = row["model"] + " " + row["pretrained"]
        fields |= set(row)
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=sorted(fields))
    w.writeheader()
    w.writerows(rows)
    return list(csv.DictReader(io.StringIO(buf.getvalue())))


def test_results_are_clip_benchmark_results(data, tmp_path, cli):
    code, _, err = cli("eval", "linear", *TINY_VIT_ARGV, "--train", str(data / "train"), "--val", str(data / "val"),
                       "--protocol", "clip_benchmark", "--epochs", "2", "--no-cache", "--dataset", "colors",
                       "--save", str(tmp_path / "lp.json"))
    assert code == 0, err
    lp = json.loads((tmp_path / "lp.json").read_text())
    assert lp["task"] == "linear_probe" and lp["dataset"] == "colors" and lp["pretrained"] == "random-init"
    assert lp["metrics"]["lp_acc1"] == lp["top1"] and lp["metrics"]["lp_acc5"] is None  # 4 classes
    assert lp["metrics"]["protocol"] == "clip_benchmark" and lp["language"] == "en"
    assert lp["preprocess"]["library"] == "timm"
    knn = eval_knn(TINY_VIT_ARGV[0], data / "train", data / "val", ks=(3,), random_init=True,
                   model_kwargs=json.loads(TINY_VIT_ARGV[3]), cache_dir=False)
    save_result(knn, tmp_path / "knn.json")
    rows = _clip_benchmark_build([tmp_path / "lp.json", tmp_path / "knn.json"])
    assert [r["task"] for r in rows] == ["linear_probe", "knn"]
    assert rows[1]["dataset"] == data.name and float(rows[1]["acc1"]) == knn["top1"]
    assert rows[0]["model_fullname"] == f"{TINY_VIT_ARGV[0]} random-init"


def test_report_reads_clip_benchmark_files(tmp_path):
    cb = {"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
          "task": "zeroshot_classification", "language": "en",
          "metrics": {"acc1": 0.9, "acc5": float("nan"), "mean_per_class_recall": 0.88}}
    (tmp_path / "cb.json").write_text(json.dumps(cb))  # clip_benchmark writes NaN for a missing top-5
    ret = {**cb, "dataset": "mscoco_captions", "task": "zeroshot_retrieval",
           "metrics": {"image_retrieval_recall@5": 0.6, "text_retrieval_recall@5": 0.7}}
    (tmp_path / "ret.json").write_text(json.dumps(ret))
    cap = {**cb, "task": "captioning", "metrics": {"bleu": 0.1}}
    (tmp_path / "cap.json").write_text(json.dumps(cap))
    mine = {"metric": "zeroshot", "model": "pruned", "role": "pruned", "top1": 0.85, "mean_per_class_recall": 0.8,
            "dataset": "cifar10"}
    render_report([tmp_path / "cb.json", tmp_path / "ret.json", tmp_path / "cap.json", mine], tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "report.json").read_text())
    base, pruned = summary["rows"]
    assert base["model"] == "ViT-B-32 laion2b_s34b_b79k" and summary["baseline"] == base["model"]
    assert base["zeroshot top-1 (cifar10)"] == 0.9 and pruned["zeroshot top-1 (cifar10) delta"] == pytest.approx(-0.05)
    assert pruned["zeroshot mean per-class recall (cifar10) delta"] == pytest.approx(-0.08)
    assert base["t→i R@5 (mscoco_captions)"] == 0.6 and base["i→t R@5 (mscoco_captions)"] == 0.7
    assert base["retrieval mean recall@5 (mscoco_captions)"] == pytest.approx(0.65)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Not tabled" in md and "cap.json (captioning)" in md


# -- templates and class names in clip_benchmark's layout ----------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    import dgmr

    root = tmp_path_factory.mktemp("cbclip")
    src = Source("open_clip", "dgmr-test-cb-tiny-clip", model_cfg=json.loads(json.dumps(TINY_OPEN_CLIP)))
    torch.manual_seed(0)
    dgmr.save(build_model(src, pretrained=False), root / "clip", source=src)
    return root / "clip"


def test_per_dataset_json_files_and_c_templates(data, tiny_clip, tmp_path, cli):
    names = sorted(COLORS)
    (tmp_path / "names.txt").write_text("\n".join(names))
    (tmp_path / "tpl.txt").write_text("a photo of a {}.\na {} thing.\n")
    (tmp_path / "en_classnames.json").write_text(json.dumps({"other": ["x"], "colors": names}))
    (tmp_path / "en_zeroshot_classification_templates.json").write_text(json.dumps(
        {"other": ["{c}"], "colors": ["a photo of a {c}.", "a {c} thing."]}))
    plain = eval_zeroshot(tiny_clip, data / "val", classnames=tmp_path / "names.txt", templates=tmp_path / "tpl.txt",
                          cache_dir=False)
    code, out, err = cli("eval", "zeroshot", str(tiny_clip), "--data", str(data / "val"), "--dataset", "colors",
                         "--classnames", str(tmp_path / "en_classnames.json"), "--templates",
                         str(tmp_path / "en_zeroshot_classification_templates.json"), "--no-cache", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["templates"] == 2 and res["dataset"] == "colors" and res["task"] == "zeroshot_classification"
    for k in ("top1", "top5", "mean_per_class_recall"):
        assert res[k] == plain[k]
    assert res["top5"] is None and res["metrics"]["acc5"] is None
    code, _, err = cli("eval", "zeroshot", str(tiny_clip), "--data", str(data / "val"), "--no-cache",
                       "--classnames", str(tmp_path / "en_classnames.json"))
    assert code == 2 and f"no entry for dataset '{data.name}'" in err and err.count("\n") == 1


@pytest.mark.parametrize("name, content, needle", [
    ("names.txt", b"red\n\xff\xfe\n", "is not UTF-8 text"),
    ("names.json", b'["red", \xff]', "is not UTF-8 text"),
    ("names.json", b'["red",', "is not valid JSON"),
    ("names.json", b'[1, 2]', "must hold a JSON list of strings"),
    ("names.json", b'[" ", ""]', "is empty"),
    ("missing.json", None, "does not exist"),
    ("fifo.txt", "fifo", "is not a regular file"),
])
def test_name_and_template_files_fail_in_one_clear_error(tmp_path, name, content, needle):
    """Every bad class-name/template file is one DgmrError (a non-UTF-8 text file was a
    UnicodeDecodeError; a FIFO must not block)."""
    from dgmr.data.labeled import read_named_lists

    p = tmp_path / name
    if content == "fifo":
        os.mkfifo(p)
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(DgmrError, match=needle):
        read_named_lists(p, "class names", "colors")
    assert read_named_lists(_write(tmp_path / "ok.json", b'[" red ", "green"]'), "class names") == ["red", "green"]


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_cli_crop_pct_and_ties(data, tiny_clip, tmp_path, cli):
    code, out, err = cli("eval", "knn", str(tiny_clip), "--train", str(data / "train"), "--val", str(data / "val"),
                         "--k", "3", "--crop-pct", "0.875", "--no-cache", "--json")
    assert code == 0, err
    pre = json.loads(out)["preprocess"]
    assert pre["library"] == "dgmr" and pre["resize"] == round(32 / 0.875) and pre["crop"] == 32
    code, _, err = cli("eval", "knn", str(tiny_clip), "--train", str(data / "train"), "--val", str(data / "val"),
                       "--crop-pct", "2", "--no-cache")
    assert code == 2 and "--crop-pct must be in (0, 1]" in err and err.count("\n") == 1
    caps = [{"image": f"val/{c}/{i}.png", "captions": [f"a {c} picture", "a picture"]} for c in COLORS for i in range(2)]
    (tmp_path / "caps.json").write_text(json.dumps(caps))  # "a picture" for every image: tied text embeddings
    got = {}
    for ties in ("expected", "optimistic"):
        code, out, err = cli("eval", "retrieval", str(tiny_clip), "--captions", str(tmp_path / "caps.json"),
                             "--images", str(data), "--ties", ties, "--k", ",".join(map(str, range(1, 17))),
                             "--no-cache", "--json")
        assert code == 0, err
        got[ties] = json.loads(out)
        assert got[ties]["ties"] == ties and got[ties]["task"] == "zeroshot_retrieval"
    assert got["expected"]["tied_queries"] > 0
    for k in range(1, 17):
        assert got["expected"]["image_to_text"][f"R@{k}"] <= got["optimistic"]["image_to_text"][f"R@{k}"]
    # a tied query is a sure hit for optimistic at K = (wrong items above) + 1, only a chance for expected
    assert got["expected"]["mean_recall"] < got["optimistic"]["mean_recall"]
    assert got["expected"]["metrics"]["image_retrieval_recall@1"] == got["expected"]["text_to_image"]["R@1"]


def test_clip_benchmark_probe_trains_on_clip_image_embeddings(data, tiny_clip, tmp_path):
    from dgmr.evaluate import eval_linear

    zs = eval_zeroshot(tiny_clip, data / "val", classnames=sorted(COLORS), templates=["a {c}."],
                       cache_dir=tmp_path)
    lp = eval_linear(tiny_clip, data / "train", data / "val", protocol="clip_benchmark", epochs=1,
                     cache_dir=tmp_path)
    assert lp["features"] == "clip_image" and lp["feature_dim"] == TINY_OPEN_CLIP["embed_dim"]
    assert lp["cache"]["hits"] == 1 and zs["cache"]["misses"] == 1  # val embeddings: the ones zero-shot cached
    pooled = eval_linear(tiny_clip, data / "train", data / "val", cache_dir=False)
    assert pooled["features"] == "pooled" and pooled["protocol"] == "lbfgs"


def test_templates_fill_like_str_format():
    from dgmr.evaluate.zeroshot import fill_template

    assert fill_template("a photo of a {c}.", "dog") == "a photo of a dog."
    assert fill_template("a {} photo, {{}} braces", "dog") == "a dog photo, {} braces"
    assert fill_template("a photo of a {c} {{style}}.", "dog") == "a photo of a dog {style}."
    assert fill_template("a photo of a {}.", "{}-shaped thing") == "a photo of a {}-shaped thing."
    with pytest.raises(DgmrError, match="one kind of class slot"):
        fill_template("a {c} and a {}", "dog")


def test_fixed_crop_keeps_an_open_clip_tags_normalisation():
    """--crop-pct on a SigLIP tag built without its weights: the tag's mean/std (0.5), not OpenAI's."""
    from dgmr.models.preprocess import resolve_eval_preprocess
    from dgmr.models.sources import build_model, parse_spec

    src = parse_spec("open_clip:ViT-B-16-SigLIP:webli")
    pre = resolve_eval_preprocess(build_model(src, meta=True), source=src, crop=0.875)
    assert pre.settings["mean"] == [0.5, 0.5, 0.5] and pre.settings["std"] == [0.5, 0.5, 0.5]
