"""Streaming prune (dgmr.stream): same result as the in-memory prune, bounded memory, clean failures."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

import dgmr
from dgmr.artifact import load, load_kept_indices
from dgmr.cli import main
from dgmr.families import family_of
from dgmr.sources import build_model, parse_spec
from dgmr.stream import open_checkpoint, parse_size, stream_prune

from tiny_models import CASES, build

TINY_VIT = ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2})


def write_sharded(sd: dict[str, torch.Tensor], d: Path, n_shards: int = 2) -> Path:
    """An HF-style sharded checkpoint (model-0000i-of-0000n.safetensors + index) of ``sd``."""
    d.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    per = -(-len(names) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].detach().contiguous() for k in names[i * per:(i + 1) * per]}
        save_file(part, str(d / fname))
        weight_map.update({k: fname for k in part})
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def tiny_vit(seed: int = 0, **kw) -> tuple[torch.nn.Module, dgmr.Source]:
    spec, kwargs = TINY_VIT
    src = parse_spec(spec, {**kwargs, **kw})
    torch.manual_seed(seed)
    return build_model(src, pretrained=False), src


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


STREAM_CASES = ["timm_vit", "timm_dinov2_swiglu_packed", "timm_eva02_swiglu_norm", "open_clip_vit",
                "open_clip_timm_tower", "hf_clip", "hf_dinov2_swiglu"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in STREAM_CASES], ids=lambda c: c.id)
def test_streaming_equals_in_memory_prune_bit_for_bit(case, tmp_path):
    model, src = build(case, tmp_path)
    index = write_sharded(model.state_dict(), tmp_path / "ckpt", n_shards=3)
    # the in-memory path on the same weights
    ref_model, ref_src = copy.deepcopy(model), copy.deepcopy(src)
    sites = family_of(ref_model).mlps(ref_model)
    k = max(1, sites[0].hidden // 3)
    _, rec = dgmr.prune(ref_model, hidden=k, progress=False, source=ref_src)
    dgmr.save(ref_model, tmp_path / "mem", source=ref_src, record=rec, native=False)

    # small shards: the output is sharded too
    res = stream_prune(src.spec, index, tmp_path / "stream", hidden=k,
                       model_kwargs=src.kwargs, shard_size=40_000, progress=False)
    out = tmp_path / "stream"
    assert (out / "model.safetensors.index.json").is_file() and res["files"] > 2
    assert res["hidden_after"] == [k] and res["mlp_layers"] == len(sites)
    got = load(out)
    same_state(got, load(tmp_path / "mem"))
    mem_kept, st_kept = load_kept_indices(tmp_path / "mem"), load_kept_indices(out)
    assert mem_kept.keys() == st_kept.keys() and all(torch.equal(mem_kept[n], st_kept[n]) for n in mem_kept)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "dgmr" and cfg["widths"] == json.loads((tmp_path / "mem" / "config.json").read_text())["widths"]
    assert res["params_after"] == sum(p.numel() for p in family_of(got).vision_root(got)[1].parameters())


def test_cli_single_file_output_and_native_timm_export(tmp_path, capsys):
    model, src = tiny_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    rc = main(["prune", TINY_VIT[0], "--model-kwargs", json.dumps(TINY_VIT[1]), "--weights",
               str(tmp_path / "w.safetensors"), "--mlp-ratio", "1", "--dtype", "bfloat16", "--out",
               str(tmp_path / "out"), "--max-memory", "20GB", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["files"] == 1 and res["hidden_after"] == [192]
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    got = load(out)
    assert next(got.parameters()).dtype == torch.bfloat16
    ref, _ = dgmr.prune(model, mlp_ratio=1, progress=False)
    same_state(got, ref.to(torch.bfloat16))
    # timm's own loader reads the single file with the recorded mlp_ratio
    import timm

    tcfg = json.loads((out / "timm_config.json").read_text())
    native = timm.create_model(tcfg["model_name"], pretrained=True, **tcfg["kwargs"],
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    same_state(native.to(torch.bfloat16), ref)


def run_err(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after the cleared progress bar
    assert rc == 2 and err.startswith("dgmr: error: ") and len(err.splitlines()) == 1, err
    return err


def argv_for(weights, out, *extra):
    return ["prune", TINY_VIT[0], "--model-kwargs", json.dumps(TINY_VIT[1]), "--weights", str(weights),
            "--mlp-ratio", "1", "--out", str(out), *extra]


def no_output(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_truncated_shard_is_a_clear_error_and_leaves_nothing(tmp_path, capsys):
    model, _ = tiny_vit()
    index = write_sharded(model.state_dict(), tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    err = run_err(argv_for(index, tmp_path / "out"), capsys)
    assert "model-00002-of-00002.safetensors" in err and "truncated" in err
    no_output(tmp_path)


def test_mismatched_checkpoint_is_a_clear_error_and_leaves_nothing(tmp_path, capsys):
    other, _ = tiny_vit(depth=3)  # one block more than the spec
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w.safetensors"))
    err = run_err(argv_for(tmp_path / "w.safetensors", tmp_path / "out"), capsys)
    assert "does not match the architecture" in err and "unexpected" in err and "blocks.2." in err
    wide, _ = tiny_vit(mlp_ratio=2.0)  # same names, other shapes
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "w2.safetensors"))
    err = run_err(argv_for(tmp_path / "w2.safetensors", tmp_path / "out"), capsys)
    assert "wrong shape" in err and "mlp.fc1" in err
    # an index naming a shard that is not there
    model, _ = tiny_vit()
    index = write_sharded(model.state_dict(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model-00001-of-00002.safetensors").unlink()
    err = run_err(argv_for(index, tmp_path / "out"), capsys)
    assert "model-00001-of-00002.safetensors" in err and "does not exist" in err
    err = run_err(argv_for(tmp_path / "nope.safetensors", tmp_path / "out"), capsys)
    assert "does not exist" in err
    no_output(tmp_path)


def test_failure_in_the_middle_removes_the_partial_output(tmp_path, capsys):
    model, _ = tiny_vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")  # the second block cannot be scored
    index = write_sharded(sd, tmp_path / "ckpt")
    err = run_err(argv_for(index, tmp_path / "out", "--max-memory", "64GB"), capsys)
    assert "NaN" in err
    no_output(tmp_path)


def test_bad_flags(tmp_path, capsys):
    model, _ = tiny_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    w = tmp_path / "w.safetensors"
    assert "too small" in run_err(argv_for(w, tmp_path / "out", "--max-memory", "10MB"), capsys)
    assert "cannot read the size" in run_err(argv_for(w, tmp_path / "out", "--max-memory", "lots"), capsys)
    assert "exclude each other" in run_err(argv_for(w, tmp_path / "out", "--random-init"), capsys)
    assert "--weights" in run_err(["prune", TINY_VIT[0], "--random-init", "--model-kwargs", json.dumps(TINY_VIT[1]),
                                   "--mlp-ratio", "1", "--max-memory", "3GB", "--out", str(tmp_path / "out")], capsys)
    no_output(tmp_path)
    assert parse_size("3GB") == 3_000_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("800M") == 800_000_000


def test_memory_stays_bounded_on_a_mid_size_checkpoint(tmp_path):
    """ViT-B/16-sized blocks (d=768, h=3072), 10 of them: a ~290 MB float32 checkpoint,
    written shard by shard. The streaming prune must stay far below the checkpoint size."""
    src = parse_spec("timm:vit_base_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 10})
    meta = build_model(src, meta=True)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    names = list(shapes)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    weight_map, g = {}, torch.Generator().manual_seed(0)
    shard_names = [names[i::4] for i in range(4)]
    for i, part in enumerate(shard_names):
        fname = f"part{i}.safetensors"
        save_file({k: torch.randn(shapes[k], generator=g) * 0.02 for k in part}, str(ckpt_dir / fname))
        weight_map.update({k: fname for k in part})
    index = ckpt_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    ckpt_bytes = open_checkpoint(index).nbytes
    assert ckpt_bytes > 250e6

    rss0 = psutil.Process().memory_info().rss
    budget = 220e6  # resident growth allowed: one MLP (fp32 weights + fp64 scoring) + a 64 MB shard, with margin
    res = stream_prune(src.spec, index, tmp_path / "out", hidden=64, model_kwargs=src.kwargs,
                       max_memory=int(rss0 + budget), progress=False)
    grew = res["peak_rss_bytes"] - rss0
    assert grew < budget and grew < 0.75 * ckpt_bytes, (grew, ckpt_bytes)
    assert res["files"] >= 2 and res["hidden_after"] == [64]
    # the output holds exactly the pruned architecture's tensors, the cut ones sliced from the originals
    kept = load_kept_indices(tmp_path / "out")["blocks.7.mlp"]
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    fc2 = load_file(str(tmp_path / "out" / out_index["blocks.7.mlp.fc2.weight"]))["blocks.7.mlp.fc2.weight"]
    orig = load_file(str(ckpt_dir / weight_map["blocks.7.mlp.fc2.weight"]))["blocks.7.mlp.fc2.weight"]
    assert torch.equal(fc2, orig[:, kept])
    assert len(out_index) == len(names)
