"""Feature extraction under torchrun (2 CPU processes, gloo): the index-based gather puts
every feature back in place despite DistributedSampler padding, so the kNN numbers equal
a single-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

import dgmr
from dgmr.models.sources import parse_spec, build_model
from dgmr.evaluate import eval_knn

from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder

COLORS = {"red": (200, 30, 30), "green": (30, 190, 40), "blue": (40, 40, 210)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_single(tmp_path):
    # odd split sizes: the sampler pads rank 1 with a repeated sample
    train, val = tmp_path / "train", tmp_path / "val"
    image_folder(train, COLORS, {"red": 3, "green": 4, "blue": 2}, seed=0, noise=40)
    image_folder(val, COLORS, {"red": 2, "green": 1, "blue": 2}, seed=1, noise=40)
    torch.manual_seed(0)
    src = parse_spec(TINY_VIT_SPEC, TINY_VIT_KWARGS)
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
    from dgmr.data.labeled import ImageFolderSplit
    from dgmr.evaluate.features import extract_features, pooled_features
    from dgmr.models.families import family_of
    from dgmr.models.preprocess import eval_transform

    net = dgmr.load(model_dir)
    fam = family_of(net)
    ds = ImageFolderSplit(train, eval_transform(net, fam, source=src))  # what eval knn uses: the model's own
    feats, labels = extract_features(pooled_features(net, fam), ds, batch_size=4)
    cached = [load_file(str(p)) for p in (tmp_path / "cache").glob("*.safetensors")]
    match = [d for d in cached if d["features"].shape[0] == 9]
    assert len(match) == 1
    assert torch.equal(match[0]["labels"], labels)
    assert torch.allclose(match[0]["features"].float(), feats.float(), atol=1e-2)
