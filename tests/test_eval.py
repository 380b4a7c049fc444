"""Evaluation protocols (kNN, linear probe, zero-shot, retrieval, speed) on data the tests
generate: coloured images in ImageFolder layout, tiny random-init models, hand-checked
similarity matrices."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import dgmr
from dgmr.cli import main
from dgmr.core.errors import DgmrError
from dgmr.evaluate import (eval_knn, eval_linear, eval_retrieval, eval_zeroshot, imagenet_classnames,
                           imagenet_templates, knn_classify, linear_probe, read_captions, retrieval_recall,
                           text_classifier, zeroshot_classify)
from dgmr.models.sources import Source, build_model

from helpers import TINY_VIT_ARGV as TINY_TIMM, MeanColor, image_folder

COLORS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30), "yellow": (230, 220, 30)}
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    # root/SPLIT/CLASS/i.png: a noisy solid colour per class with a random grey disc on it
    image_folder(root / "train", COLORS, 6, seed=0, size=(24, 24), jitter=25, disc=True)
    image_folder(root / "val", COLORS, 3, seed=1, size=(24, 24), jitter=25, disc=True)
    return root


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random-init open_clip model saved unpruned, and its r=1 prune."""
    root = tmp_path_factory.mktemp("clip")
    src = Source("open_clip", "dgmr-test-eval-tiny-clip", model_cfg=json.loads(json.dumps(TINY_CLIP_CFG)))
    torch.manual_seed(0)
    model = build_model(src, pretrained=False)
    dgmr.save(model, root / "orig", source=src)
    pruned, rec = dgmr.prune(model, mlp_ratio=1.0, source=src, progress=False)
    dgmr.save(pruned, root / "pruned", source=src, record=rec)
    return root / "orig", root / "pruned"


# -- kNN -------------------------------------------------------------------------------
def test_knn_known_features_separable(data, tmp_path):
    res = eval_knn(MeanColor(), data / "train", data / "val", ks=(1, 5, 20), image_size=16, cache_dir=tmp_path)
    assert res["per_k"]["1"]["top1"] == 1.0 and res["per_k"]["5"]["top1"] == 1.0
    assert res["per_k"]["20"]["top1"] == 1.0  # k > one class's 6 samples: the weights still pick the right class
    assert res["n_train"] == 24 and res["n_test"] == 12 and res["num_classes"] == 4 and res["feature_dim"] == 3
    assert res["cache"] == {"hits": 0, "misses": 2, "dir": str(tmp_path)}
    again = eval_knn(MeanColor(), data / "train", data / "val", ks=(1,), image_size=16, cache_dir=tmp_path)
    assert again["cache"]["hits"] == 2 and again["cache"]["misses"] == 0 and again["top1"] == 1.0
    other = eval_knn(MeanColor(), data / "train", data / "val", ks=(1,), image_size=20, cache_dir=tmp_path)
    assert other["cache"]["misses"] == 2  # a different transform is a different cache entry


def test_knn_shuffled_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    ytr, yte = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (800,), generator=g)
    xtr = centers[ytr] + torch.randn(800, 16, generator=g)
    xte = centers[yte] + torch.randn(800, 16, generator=g)
    assert knn_classify(xtr, ytr, xte, yte, ks=(10,))["top1"] == 1.0
    shuffled = ytr[torch.randperm(800, generator=g)]
    res = knn_classify(xtr, shuffled, xte, yte, ks=(10, 20))
    for k in ("10", "20"):
        assert abs(res["per_k"][k]["top1"] - 0.25) < 0.06
        assert res["per_k"][k]["top5"] is None  # 4 classes: no top-5 (null, as clip_benchmark and the other protocols)


def test_knn_weighted_vote_and_chunking():
    # one very close neighbour of class 0 outweighs two distant ones of class 1 (a plain majority says 1)
    ang = torch.tensor([0.05, 1.0, 1.02])
    train = torch.stack([ang.cos(), ang.sin()], 1)
    res = knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ks=(3,))
    assert res["top1"] == 1.0
    res_t1 = knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ks=(3,),
                          temperature=10.0)
    assert res_t1["top1"] == 0.0  # a flat temperature is a majority vote
    g = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    ytr, yte = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (50,), generator=g)
    whole = knn_classify(xtr, ytr, xte, yte, ks=(1, 10, 400))
    chunked = knn_classify(xtr, ytr, xte, yte, ks=(1, 10, 400), test_chunk=7, train_chunk=13)
    assert whole["per_k"] == chunked["per_k"]
    nn1 = (torch.nn.functional.normalize(xte, dim=1) @ torch.nn.functional.normalize(xtr, dim=1).T).argmax(1)
    assert whole["per_k"]["1"]["top1"] == pytest.approx(float((ytr[nn1] == yte).float().mean()))


def test_knn_bad_input():
    with pytest.raises(DgmrError, match="training split is empty"):
        knn_classify(torch.empty(0, 4), torch.empty(0, dtype=torch.long), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DgmrError, match="dims"):
        knn_classify(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


# -- linear probe ----------------------------------------------------------------------
def test_linear_probe_separable_and_shuffled():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 2
    ytr, yte = torch.randint(0, 5, (400,), generator=g), torch.randint(0, 5, (200,), generator=g)
    xtr, xte = centers[ytr] + torch.randn(400, 32, generator=g), centers[yte] + torch.randn(200, 32, generator=g)
    res = linear_probe(xtr, ytr, xte, yte, weight_decays=(1e-3, 1e-1), max_iter=100)
    assert res["top1"] >= 0.97 and res["weight_decay"] in (1e-3, 1e-1) and set(res["val_top1"]) == {"0.001", "0.1"}
    assert 70 <= res["n_held_out"] <= 90 and res["n_held_out"] + 0 < res["n_train"]
    shuffled = linear_probe(xtr, ytr[torch.randperm(400, generator=g)], xte, yte, weight_decays=(1e-3,), max_iter=50)
    assert shuffled["top1"] < 0.4  # chance is 0.2


def test_linear_eval_on_folders(data, tmp_path):
    res = eval_linear(MeanColor(), data / "train", data / "val", image_size=16, cache_dir=tmp_path, weight_decays=(1e-3,))
    assert res["metric"] == "linear" and res["top1"] == 1.0 and res["num_classes"] == 4


# -- retrieval -------------------------------------------------------------------------
def test_retrieval_recall_hand_checked():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.3],    # image 0: best caption 0 (right)            -> rank 0
                        [0.2, 0.7, 0.5, 0.6],    # image 1: 0.7 (wrong), 0.6 (wrong), 0.5 right -> rank 2
                        [0.1, 0.2, 0.3, 0.25]])  # image 2: 0.3 (wrong) beats 0.25 (right)     -> rank 1
    res = retrieval_recall(sim, [0, 0, 1, 2], ks=(1, 2, 3))
    assert res["image_to_text"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": 1.0}
    # caption columns: c0 right=img0 (0.9 top) r0; c1 right=img0 0.1 < 0.7, 0.2 -> r2; c2 right=img1 0.5 < 0.8 -> r1;
    # c3 right=img2 0.25 < 0.6, 0.3 -> r2
    assert res["text_to_image"] == {"R@1": 0.25, "R@2": 0.5, "R@3": 1.0}
    assert res["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 0.25 + 0.5 + 1) / 6)
    with pytest.raises(DgmrError, match="no caption"):
        retrieval_recall(sim, [0, 0, 1, 1])


def test_captions_formats(data, tmp_path):
    (tmp_path / "c.csv").write_text("filepath,title\nval/red/0.png,a red thing\nval/red/0.png,red\nval/blue/1.png,blue\n")
    caps = read_captions(tmp_path / "c.csv", data)
    assert caps.caption_image == [0, 0, 1] and caps.captions[1] == "red" and caps.images[1] == data / "val/blue/1.png"
    coco = {"images": [{"id": 7, "file_name": "val/green/2.png"}],
            "annotations": [{"image_id": 7, "caption": "green"}, {"image_id": 7, "caption": "grass"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert read_captions(tmp_path / "coco.json", data).caption_image == [0, 0]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "val/red/99.png", "caption": "x"}]))
    with pytest.raises(DgmrError, match="not found"):
        read_captions(tmp_path / "bad.json", data)


# -- zero-shot -------------------------------------------------------------------------
def test_packaged_data_files():
    names, templates = imagenet_classnames(), imagenet_templates()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)


def test_text_classifier_is_mean_of_normalised_prompts():
    def enc(texts):  # a deterministic fake text tower: embedding depends on the text
        return torch.stack([torch.tensor([len(t), t.count("a") + 1.0, sum(map(ord, t)) % 7 + 1.0]) for t in texts])

    clf = text_classifier(enc, ["cat", "dog"], ["a {}.", "the {} photo"], batch_size=3)
    want = torch.nn.functional.normalize(torch.nn.functional.normalize(enc(["a cat.", "the cat photo"]), dim=1).mean(0), dim=0)
    assert torch.allclose(clf[0], want)
    res = zeroshot_classify(torch.stack([clf[1], clf[0]]) * 3, torch.tensor([1, 0]), clf)
    assert res["top1"] == 1.0
    with pytest.raises(DgmrError, match="no '\\{c\\}' or '\\{\\}'"):
        text_classifier(enc, ["cat"], ["a photo"])
    # clip_benchmark's {c} slot and per-class prompts give the same class embedding
    assert torch.equal(text_classifier(enc, ["cat", "dog"], ["a {c}.", "the {c} photo"], batch_size=3), clf)
    per_class = {"cat": ["a cat.", "the cat photo"], "dog": ["a dog.", "the dog photo"]}
    assert torch.allclose(text_classifier(enc, ["cat", "dog"], per_class), clf)


def test_zeroshot_open_clip_end_to_end(data, clip_dirs, tmp_path):
    import open_clip

    orig, pruned = clip_dirs
    names = tmp_path / "names.txt"
    names.write_text("\n".join(sorted(COLORS)) + "\n")
    res = eval_zeroshot(orig, data / "val", classnames=names, cache_dir=tmp_path / "cache")
    assert res["templates"] == 80 and res["num_classes"] == 4 and res["n_test"] == 12 and res["role"] == "original"
    # the same number computed by hand: open_clip's tokenizer, template averaging, cosine argmax
    model = dgmr.load(orig)
    tok = open_clip.get_tokenizer("dgmr-test-eval-tiny-clip", context_length=16)
    with torch.no_grad():
        cls = []
        for c in sorted(COLORS):
            e = torch.nn.functional.normalize(model.encode_text(tok([t.format(c) for t in imagenet_templates()])), dim=-1)
            cls.append(torch.nn.functional.normalize(e.mean(0), dim=0))
        from dgmr.evaluate import ImageFolderSplit, eval_transform
        ds = ImageFolderSplit(data / "val", eval_transform(32, model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073),
                                                           model.visual.image_std or (0.26862954, 0.26130258, 0.27577711), 1.0))
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        pred = (model.encode_image(x) @ torch.stack(cls).T).argmax(1)
    assert res["top1"] == pytest.approx(float((pred == ds.labels).float().mean()), abs=1 / 12 + 1e-6)
    # a pruned image tower evaluated with the original text tower
    res_p = eval_zeroshot(pruned, data / "val", classnames=names, templates=["a photo of {}."], text_model=orig,
                          cache_dir=False)
    assert res_p["role"] == "pruned" and res_p["text_model"] == str(orig) and 0 <= res_p["top1"] <= 1
    assert res_p["flops"] < res["flops"] and res_p["params"] < res["params"]


def test_zeroshot_and_retrieval_cli(data, clip_dirs, tmp_path, cli):
    orig, pruned = clip_dirs
    names = tmp_path / "names.json"
    names.write_text(json.dumps(sorted(COLORS)))
    code, out, err = cli("eval", "zeroshot", str(pruned), "--data", str(data / "val"), "--classnames", str(names),
                         "--no-cache", "--json", "--save", str(tmp_path / "zs.json"))
    assert code == 0, err
    assert json.loads(out)["top1"] == json.loads((tmp_path / "zs.json").read_text())["top1"]
    caps = [{"image": f"val/{c}/{i}.png", "captions": [f"a {c} picture", f"{c}"]} for c in COLORS for i in range(2)]
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    code, out, err = cli("eval", "retrieval", str(orig), "--captions", str(tmp_path / "caps.json"),
                         "--images", str(data), "--no-cache", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["n_images"] == 8 and res["n_captions"] == 16
    assert set(res["image_to_text"]) == {"R@1", "R@5", "R@10"} and res["image_to_text"]["R@10"] == 1.0
    res2 = eval_retrieval(orig, tmp_path / "caps.json", data, cache_dir=False, ks=(1,))
    code, _, err = cli("eval", "zeroshot", str(orig), "--data", str(data / "val"), "--no-cache")
    assert code == 2 and "give --classnames" in err and err.count("\n") == 1
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    code, _, err = cli("eval", "zeroshot", str(orig), "--data", str(data / "val"), "--no-cache",
                       "--classnames", str(tmp_path / "three.txt"))
    assert code == 2 and "3 class names for 4 class folders" in err
    assert res2["image_to_text"]["R@1"] == res["image_to_text"]["R@1"]


def test_zeroshot_hf_clip_with_local_tokenizer(data, tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", "a", "photo", "of", ".", *sorted(COLORS)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "hfclip")
    with pytest.raises(DgmrError, match="no tokenizer found locally"):
        eval_zeroshot(f"hf:{tmp_path / 'hfclip'}", data / "val", classnames=sorted(COLORS), cache_dir=False)
    tok.save_pretrained(tmp_path / "hfclip")
    res = eval_zeroshot(f"hf:{tmp_path / 'hfclip'}", data / "val", classnames=sorted(COLORS),
                        templates=["a photo of {} ."], cache_dir=False)
    assert res["family"] == "hf" and res["num_classes"] == 4 and 0 <= res["top1"] <= 1


def test_zeroshot_user_mistakes(data, cli, tmp_path):
    code, _, err = cli("eval", "zeroshot", *TINY_TIMM, "--data", str(data / "val"), "--no-cache")
    assert code == 2 and "CLIP-style" in err and err.count("\n") == 1
    with pytest.raises(DgmrError, match="CLIP-style"):
        eval_zeroshot(MeanColor(), data / "val", classnames=sorted(COLORS), cache_dir=False)


# -- speed -----------------------------------------------------------------------------
def test_speed_reports_both_models(tmp_path, capsys, cli):
    pruned = tmp_path / "pruned"
    assert main(["prune", *TINY_TIMM, "--mlp-ratio", "1", "--out", str(pruned), "--json"]) == 0
    capsys.readouterr()
    code, out, err = cli("eval", "speed", "timm:vit_tiny_patch16_224", str(pruned), "--random-init",
                         "--model-kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}', "--batch-size", "4",
                         "--repeats", "3", "--warmup", "1", "--json", "--save", str(tmp_path / "speed.json"))
    assert code == 0, err
    res = json.loads(out)
    orig, small = res["models"]["timm:vit_tiny_patch16_224"], res["models"][str(pruned)]
    for row in (orig, small):
        assert row["throughput"] > 0 and row["flops"] > 0 and row["peak_memory_bytes"] > 0 and row["latency_ms"] > 0
    assert small["params"] < orig["params"] and small["role"] == "pruned" and orig["role"] == "original"
    assert res["flops_ratio"] == pytest.approx(orig["flops"] / small["flops"]) and res["flops_ratio"] > 1.2
    assert res["speedup"] == pytest.approx(small["throughput"] / orig["throughput"])
    assert json.loads((tmp_path / "speed.json").read_text())["flops_ratio"] == res["flops_ratio"]


def test_bad_input_is_one_line(data, tmp_path, cli):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    code, _, err = cli("eval", "knn", *TINY_TIMM, "--train", str(tmp_path / "empty"), "--val", str(data / "val"),
                       "--no-cache")
    assert code == 2 and "empty split" in err and err.count("\n") == 1
    code, _, err = cli("eval", "knn", *TINY_TIMM, "--train", str(data / "train"), "--val", str(data / "val"),
                       "--image-size", "48", "--no-cache")
    assert code == 2 and "cannot take 48 px" in err and err.count("\n") == 1
    code, _, err = cli("eval", "speed", *TINY_TIMM, "--image-size", "48")
    assert code == 2 and "cannot take 48 px" in err
    code, _, err = cli("eval", "knn", *TINY_TIMM, "--train", str(tmp_path / "nope"), "--val", str(data / "val"))
    assert code == 2 and "does not exist" in err
    (tmp_path / "corrupt" / "red").mkdir(parents=True)
    (tmp_path / "corrupt" / "red" / "0.png").write_text("not an image")
    with pytest.raises(DgmrError, match="cannot read image"):
        eval_knn(MeanColor(), data / "train", tmp_path / "corrupt", image_size=16, cache_dir=False)
    with pytest.raises(DgmrError, match="training split does not have"):
        (tmp_path / "v2" / "purple").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "v2" / "purple" / "0.png")
        eval_knn(MeanColor(), data / "train", tmp_path / "v2", image_size=16, cache_dir=False)


def test_knn_cli_matches_library(data, tmp_path, cli):
    code, out, err = cli("eval", "knn", *TINY_TIMM, "--train", str(data / "train"), "--val", str(data / "val"),
                         "--k", "1,3", "--cache-dir", str(tmp_path), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert set(res["per_k"]) == {"1", "3"} and math.isclose(res["top1"], max(v["top1"] for v in res["per_k"].values()))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # train + val features cached
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left
