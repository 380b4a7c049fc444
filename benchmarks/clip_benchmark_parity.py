"""dgmr's zero-shot and retrieval numbers next to clip_benchmark's, on the same model and images.

Needs clip_benchmark importable (it is not a dgmr dependency; its own dependencies are
dgmr's): ``pip install --no-deps --target /tmp/cb clip_benchmark`` then
``PYTHONPATH=/tmp/cb python benchmarks/clip_benchmark_parity.py``. A random-init open_clip
ViT (small, offline) is saved as a dgmr directory; clip_benchmark gets the same model with
open_clip's own eval transform. Images are generated, non-square. Prints both sides' metrics
and whether they agree exactly, with AMP off on both sides.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CFG = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CLASSES = ["red apple", "green leaf", "blue sky", "yellow sun", "black cat", "white snow"]


def make_images(root: Path, per_class: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    items = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            base = rng.integers(0, 256, 3)
            px = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{j}.png")
            items.append((f"{name}/{j}.png", c))
    return items


def clip_benchmark_side(model_dir: Path, data: Path, caps: dict[str, list[str]], templates: list[str]) -> dict:
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from torchvision.datasets import ImageFolder

    import dgmr

    def accuracy(output, target, topk=(1,)):  # clip_benchmark 1.6.2's, minus float() of a 1-element array (NumPy 2)
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

    zeroshot_classification.accuracy = accuracy
    model = dgmr.load(model_dir).eval()
    transform = open_clip.image_transform(CFG["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ds = ImageFolder(str(data), transform=transform)
    dl = torch.utils.data.DataLoader(ds, batch_size=16)
    zs = zeroshot_classification.evaluate(model, dl, tokenizer, ds.classes, templates, "cpu", amp=False)

    class Pairs(torch.utils.data.Dataset):
        def __init__(self):
            self.items = list(caps.items())

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, texts = self.items[i]
            return transform(Image.open(data / path).convert("RGB")), texts

    rl = torch.utils.data.DataLoader(Pairs(), batch_size=16, collate_fn=lambda b: (torch.stack([x for x, _ in b]),
                                                                                 [t for _, t in b]))
    rt = zeroshot_retrieval.evaluate(model, rl, tokenizer, recall_k_list=[1, 5], device="cpu", amp=False)
    return {"zeroshot": zs, "retrieval": rt}


def dgmr_side(model_dir: Path, data: Path, captions: Path, templates: list[str]) -> dict:
    from dgmr.evaluate.tasks import eval_retrieval, eval_zeroshot

    zs = eval_zeroshot(model_dir, data, classnames=sorted(CLASSES), templates=templates, cache_dir=False)
    rt = eval_retrieval(model_dir, captions, data, ks=(1, 5), cache_dir=False, ties="optimistic")
    return {"zeroshot": zs["metrics"], "retrieval": rt["metrics"], "preprocess": zs.get("preprocess")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--json", help="write both sides' metrics here")
    a = p.parse_args()
    import dgmr
    from dgmr.models.sources import Source, build_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Source("open_clip", "dgmr-parity-tiny-clip", model_cfg=CFG)
        dgmr.save(build_model(src, pretrained=False), tmp / "model", source=src)
        items = make_images(tmp / "images", a.per_class)
        caps = {path: [f"a photo of a {CLASSES[c]}.", f"{CLASSES[c]} number {i}"] for i, (path, c) in enumerate(items)}
        (tmp / "captions.json").write_text(json.dumps(caps))
        templates = ["a photo of a {c}.", "a {c}.", "itap of a {c}."]
        cb = clip_benchmark_side(tmp / "model", tmp / "images", caps, templates)
        ours = dgmr_side(tmp / "model", tmp / "images", tmp / "captions.json", templates)
    rows = []
    for task in ("zeroshot", "retrieval"):
        for key, value in cb[task].items():
            mine = ours[task].get(key)
            rows.append((task, key, value, mine))
            same = mine is not None and abs(float(value) - float(mine)) < 1e-9
            print(f"{task:9s} {key:32s} clip_benchmark {float(value):.6f}  dgmr "
                  f"{'-' if mine is None else f'{float(mine):.6f}'}  {'same' if same else 'DIFFERENT'}")
    if a.json:
        Path(a.json).write_text(json.dumps({"clip_benchmark": cb, "dgmr": ours}, indent=1, default=str))


if __name__ == "__main__":
    main()
