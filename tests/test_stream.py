"""Streaming prune (dgmr.prune.stream): same result as the in-memory prune, bounded memory, clean failures."""
from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgmr
from dgmr.models.artifact import load, load_kept_indices
from dgmr.cli import main
from dgmr.models.families import family_of
from dgmr.models.sources import build_model, parse_spec
from dgmr.prune.stream import open_checkpoint, parse_size, stream_prune

from helpers import TINY_VIT_KWARGS, TINY_VIT_SPEC, run_cli
from tiny_models import CASES, build

TINY_VIT = (TINY_VIT_SPEC, TINY_VIT_KWARGS)


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
    cfg = json.loads((out / "dgmr.json").read_text())
    # shards at the top, where transformers reads them beside its config.json (when one can say the widths)
    assert cfg["stream"]["layout"] == "shards"
    assert cfg["weights"] == "model.safetensors.index.json" and res["files"] > 2
    assert (out / "config.json").is_file() == (case.id == "hf_clip")
    assert res["hidden_after"] == [k] and res["mlp_layers"] == len(sites)
    got = load(out)
    same_state(got, load(tmp_path / "mem"))
    mem_kept, st_kept = load_kept_indices(tmp_path / "mem"), load_kept_indices(out)
    assert mem_kept.keys() == st_kept.keys() and all(torch.equal(mem_kept[n], st_kept[n]) for n in mem_kept)
    assert cfg["format"] == "dgmr" and cfg["widths"] == json.loads((tmp_path / "mem" / "dgmr.json").read_text())["widths"]
    assert res["params_after"] == sum(p.numel() for p in family_of(got).vision_root(got)[1].parameters())


@pytest.mark.parametrize("case", [c for c in CASES if c.id in STREAM_CASES], ids=lambda c: c.id)
def test_streaming_output_opens_in_the_source_library(case, tmp_path):
    """Default layout: one streamed model.safetensors for timm/open_clip (their loaders read
    one file), shards beside transformers' config.json for Hugging Face models."""
    from test_families import _native, _x

    model, src = build(case, tmp_path)
    index = write_sharded(model.state_dict(), tmp_path / "ckpt", n_shards=2)
    res = stream_prune(src.spec, index, tmp_path / "out", mlp_ratio=1.0 if case.family != "hf" or "dinov2" not in case.id
                       else None, hidden=64 if "dinov2" in case.id and case.family == "hf" else None,
                       model_kwargs=src.kwargs, progress=False)
    out = tmp_path / "out"
    cfg = json.loads((out / "dgmr.json").read_text())
    got = load(out)
    assert cfg["stream"]["layout"] == ("shards" if case.family == "hf" else "file")
    if case.id == "open_clip_timm_tower":  # timm reads the trunk from the one file itself: no copy
        assert cfg["native_export"]["weights"] == "model.safetensors"
        assert sorted(p.name for p in (out / "timm_trunk").iterdir()) == ["timm_config.json"]
    x = _x(case)
    with torch.no_grad():
        native, ours = _native(case, out, cfg, got, x)
    torch.testing.assert_close(native, ours, rtol=0, atol=0)
    assert res["native_export"] == cfg["native_export"]["load"]


@pytest.mark.parametrize("naming", ["whole-model names", "tower names", "ddp prefix"])
def test_vision_tower_checkpoint(naming, tmp_path, capsys):
    """A checkpoint of the vision tower alone (open_clip `visual.*`, or the tower's own names,
    or under DDP's `module.`): the output holds the pruned tower and dgmr.load returns it."""
    case = next(c for c in CASES if c.id == "open_clip_vit")
    model, src = build(case, tmp_path)
    tower = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    if naming == "tower names":
        tower = {k.removeprefix("visual."): v for k, v in tower.items()}
    elif naming == "ddp prefix":
        tower = {f"module.{k}": v for k, v in tower.items()}
    index = write_sharded(tower, tmp_path / "ckpt")
    res = stream_prune(src.spec, index, tmp_path / "out", mlp_ratio=1.0, model_kwargs=src.kwargs, progress=False)
    assert res["weights_scope"] == "visual"
    ref, _ = dgmr.prune(copy.deepcopy(model), mlp_ratio=1.0, progress=False)
    got = load(tmp_path / "out")
    assert type(got) is type(ref.visual)
    same_state(got, ref.visual)
    x = torch.randn(2, 3, case.image_size, case.image_size)
    with torch.no_grad():
        torch.testing.assert_close(got.eval()(x), ref.visual.eval()(x), rtol=0, atol=0)
    # the dgmr commands need the whole model: one clear line, not a half-working tower
    err = run_err(["prune", str(tmp_path / "out"), "--mlp-ratio", "0.5", "--out", str(tmp_path / "again")], capsys)
    assert "holds only the vision tower" in err
    # half a tower is not a tower
    half = dict(list(tower.items())[: len(tower) // 2])
    save_file({k: v.contiguous() for k, v in half.items()}, str(tmp_path / "half.safetensors"))
    with pytest.raises(dgmr.DgmrError, match="does not match the architecture"):
        stream_prune(src.spec, tmp_path / "half.safetensors", tmp_path / "out2", mlp_ratio=1.0,
                     model_kwargs=src.kwargs, progress=False)
    assert not (tmp_path / "out2").exists()


def test_timm_tower_checkpoint_opens_in_timm(tmp_path):
    """An open_clip timm tower (EVA-CLIP's layout) from a tower-only checkpoint: timm builds
    the pruned trunk and reads it from the output's one file (visual.trunk.* names)."""
    from test_families import _native, _x

    case = next(c for c in CASES if c.id == "open_clip_timm_tower")
    model, src = build(case, tmp_path)
    tower = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    save_file({k: v.contiguous() for k, v in tower.items()}, str(tmp_path / "w.safetensors"))
    res = stream_prune(src.spec, tmp_path / "w.safetensors", tmp_path / "out", mlp_ratio=1.0,
                       model_kwargs=src.kwargs, progress=False)
    assert res["weights_scope"] == "visual" and "timm.create_model" in res["native_export"]
    cfg = json.loads((tmp_path / "out" / "dgmr.json").read_text())
    assert cfg["native_export"]["weights"] == "model.safetensors"
    ref, _ = dgmr.prune(copy.deepcopy(model), mlp_ratio=1.0, progress=False)
    with torch.no_grad():
        native, ours = _native(case, tmp_path / "out", cfg, ref.eval(), _x(case))
    torch.testing.assert_close(native, ours, rtol=0, atol=0)


def test_tower_names_of_a_tower_model_are_the_whole_model(tmp_path):
    """HF CLIPVisionModel's names are all vision_model.*: a checkpoint without that prefix is
    still the whole model (no tower-only output, native export kept)."""
    case = next(c for c in CASES if c.id == "hf_clip_vision")
    model, src = build(case, tmp_path)
    sd = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    # older HF checkpoints also carry the non-persistent position_ids buffer: ignored
    derived = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    assert derived
    sd.update({n.removeprefix("vision_model."): b for n, b in model.named_buffers() if n in derived})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    res = stream_prune(src.spec, tmp_path / "w.safetensors", tmp_path / "out", mlp_ratio=1.0,
                       model_kwargs=src.kwargs, progress=False)
    assert res["weights_scope"] is None and "from_pretrained" in res["native_export"]
    ref, _ = dgmr.prune(copy.deepcopy(model), mlp_ratio=1.0, progress=False)
    same_state(load(tmp_path / "out"), ref)


def test_mixed_dtype_checkpoint_loads_in_one_dtype(tmp_path):
    """bf16 weights with a float32 tensor among them: recorded as float32, loaded as float32
    everywhere (tensors are assigned, so they must be cast, not kept in the file's dtype)."""
    model, src = tiny_vit()
    sd = {k: (v if k == "cls_token" else v.to(torch.bfloat16)) for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    stream_prune(src.spec, tmp_path / "w.safetensors", tmp_path / "out", mlp_ratio=1.0,
                 model_kwargs=src.kwargs, progress=False)
    got = load(tmp_path / "out")
    assert {p.dtype for p in got.parameters()} == {torch.float32}
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    ref, _ = dgmr.prune(model, mlp_ratio=1.0, progress=False)
    same_state(got, ref)
    with torch.no_grad():
        assert torch.isfinite(got(torch.randn(1, 3, 32, 32))).all()


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

    native = timm.create_model(f"local-dir:{out}", pretrained=True)
    same_state(native.to(torch.bfloat16), ref)


def run_err(argv, capsys) -> str:
    rc, _, err = run_cli(capsys, *argv)
    err = err.split("\r")[-1].strip()  # after the cleared progress bar
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
    (tmp_path / "a_dir").mkdir()
    a_dir = ["prune", str(tmp_path / "a_dir"), "--weights", str(w), "--mlp-ratio", "1", "--out", str(tmp_path / "out")]
    assert ("MODEL must name an architecture (timm:NAME, open_clip:ARCH, hf:DIR), not the directory "
            f"{tmp_path / 'a_dir'}") in run_err(a_dir, capsys)
    assert "--weights" in run_err(["prune", TINY_VIT[0], "--random-init", "--model-kwargs", json.dumps(TINY_VIT[1]),
                                   "--mlp-ratio", "1", "--max-memory", "3GB", "--out", str(tmp_path / "out")], capsys)
    assert "--weights" in run_err(["prune", TINY_VIT[0], "--random-init", "--model-kwargs", json.dumps(TINY_VIT[1]),
                                   "--mlp-ratio", "1", "--shard-size", "1GB", "--out", str(tmp_path / "out")], capsys)
    rc = main(argv_for(w, tmp_path / "sharded", "--shard-size", "100KB", "--json"))
    assert rc == 0 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert "skipped" in json.loads((tmp_path / "sharded" / "dgmr.json").read_text())["native_export"]
    no_output(tmp_path)
    assert parse_size("3GB") == 3_000_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("800M") == 800_000_000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_hands_heap_memory_back():
    """The pattern a streaming prune makes: after one large free glibc keeps same-sized
    tensors on the heap, and a live tensor above them stops the heap from shrinking; the
    freed ~150 MB stay resident until :func:`dgmr.core.memory.release_freed`."""
    script = (
        "import psutil, torch\n"
        "from dgmr.core.memory import release_freed\n"
        "p = psutil.Process()\n"
        "big = torch.ones(16 * 2**20 // 4); del big\n"  # a freed mmapped block raises the mmap threshold
        "ts = [torch.ones(8 * 2**20 // 4) for _ in range(20)]\n"
        "last = ts.pop(); del ts\n"
        "before = p.memory_info().rss; release_freed(); after = p.memory_info().rss\n"
        "print((before - after) / 2**20)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split()[-1]) > 100  # MiB given back of the 152 freed


@pytest.mark.parametrize("shard_size", [None, "24MB"], ids=["one-file", "shards"])
def test_memory_stays_bounded_on_a_mid_size_checkpoint(shard_size, tmp_path):
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

    budget = 220e6  # resident growth allowed: one MLP (fp32 weights + fp64 scoring + workspace) + a shard, with margin
    # in a fresh interpreter: what earlier tests left in this process's allocator would blur the figure
    script = (
        "import json, psutil\n"
        "from dgmr.models.sources import build_model, parse_spec\n"
        "from dgmr.prune.stream import stream_prune\n"
        f"build_model(parse_spec({src.spec!r}, {src.kwargs!r}), meta=True)  # libraries loaded, as in a test process\n"
        "rss0 = psutil.Process().memory_info().rss\n"
        f"res = stream_prune({src.spec!r}, {str(index)!r}, {str(tmp_path / 'out')!r}, hidden=64, "
        f"model_kwargs={src.kwargs!r}, max_memory=int(rss0 + {budget}), shard_size={shard_size!r}, progress=False)\n"
        "print(json.dumps({'grew': res['peak_rss_bytes'] - rss0, 'files': res['files'], "
        "'hidden_after': res['hidden_after']}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = res["grew"]
    assert grew < budget and grew < 0.75 * ckpt_bytes, (grew, ckpt_bytes)
    assert (res["files"] == 1 if shard_size is None else res["files"] >= 3) and res["hidden_after"] == [64]
    # the output holds exactly the pruned architecture's tensors, the cut ones sliced from the originals
    kept = load_kept_indices(tmp_path / "out")["blocks.7.mlp"]
    if shard_size is None:
        out_index = {k: "model.safetensors" for k in load_file(str(tmp_path / "out" / "model.safetensors"))}
    else:
        out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    fc2 = load_file(str(tmp_path / "out" / out_index["blocks.7.mlp.fc2.weight"]))["blocks.7.mlp.fc2.weight"]
    orig = load_file(str(ckpt_dir / weight_map["blocks.7.mlp.fc2.weight"]))["blocks.7.mlp.fc2.weight"]
    assert torch.equal(fc2, orig[:, kept])
    assert len(out_index) == len(names)
