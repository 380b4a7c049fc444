"""Feature extraction under torchrun (2 CPU processes, gloo): the index-based gather puts
every feature back in place despite DistributedSampler padding, so the kNN numbers equal
a single-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

import dgmr
from dgmr.sources import parse_spec, build_model
from dgmr.evaluate import eval_knn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(root: Path, n_per_class: dict[str, int], seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    base = {"red": (200, 30, 30), "green": (30, 190, 40), "blue": (40, 40, 210)}
    for c, n in n_per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            noise = torch.randint(-40, 40, (20, 20, 3), generator=g)
            arr = (torch.tensor(base[c]) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_torchrun_two_processes_match_single(tmp_path):
    # odd split sizes: the sampler pads rank 1 with a repeated sample
    train = _split(tmp_path / "train", {"red": 3, "green": 4, "blue": 2}, 0)
    val = _split(tmp_path / "val", {"red": 2, "green": 1, "blue": 2}, 1)
    torch.manual_seed(0)
    src = parse_spec("timm:vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2))
    model_dir = tmp_path / "model"
    dgmr.save(build_model(src, pretrained=False), model_dir, source=src)
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dgmr.cli", "eval", "knn", str(model_dir), "--train", str(train),
           "--val", str(val), "--k", "1,3", "--batch-size", "2", "--device", "cpu", "--json", "--save", str(out),
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_res = json.loads(out.read_text())
    assert dist_res["world_size"] == 2 and dist_res["n_train"] == 9 and dist_res["n_test"] == 5
    assert proc.stdout.count('"metric": "knn"') == 1  # only rank 0 reports
    single = eval_knn(model_dir, train, val, ks=(1, 3), batch_size=4, cache_dir=False, device="cpu")
    assert single["world_size"] == 1
    assert dist_res["per_k"] == single["per_k"]
    # rank 0 cached the gathered features; they equal the single-process features row by row
    from safetensors.torch import load_file
    from dgmr.evaluate.datasets import ImageFolderSplit, eval_transform
    from dgmr.evaluate.features import extract_features, pooled_features
    from dgmr.families import family_of

    net = dgmr.load(model_dir)
    fam = family_of(net)
    dc = fam.data_config(net)
    ds = ImageFolderSplit(train, eval_transform(dc["image_size"], dc["mean"], dc["std"]))
    feats, labels = extract_features(pooled_features(net, fam), ds, batch_size=4)
    cached = [load_file(str(p)) for p in (tmp_path / "cache").glob("*.safetensors")]
    match = [d for d in cached if d["features"].shape[0] == 9]
    assert len(match) == 1
    assert torch.equal(match[0]["labels"], labels)
    assert torch.allclose(match[0]["features"].float(), feats.float(), atol=1e-2)
