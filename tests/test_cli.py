"""`dgmr prune` and `dgmr stats` end to end, and every user mistake as one clear line."""
from __future__ import annotations

import json

import pytest
import torch

import dgmr
from dgmr.cli import main

from helpers import TINY_VIT_ARGV as TINY



@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pruned"
    assert main(["prune", *TINY, "--mlp-ratio", "1", "--out", str(out), "--json"]) == 0
    return out


@pytest.mark.smoke
def test_prune_writes_artifact(pruned):
    cfg = json.loads((pruned / "dgmr.json").read_text())
    assert cfg["format"] == "dgmr" and cfg["spec"] == "timm:vit_tiny_patch16_224"
    assert cfg["prune"]["criterion"] == "diversity" and cfg["prune"]["mlp_ratio"] == 1.0
    assert set(cfg["widths"].values()) == {192} and len(cfg["widths"]) == 2
    assert cfg["dgmr_version"] == dgmr.__version__
    assert (pruned / "model.safetensors").is_file() and (pruned / "dgmr" / "kept_indices.safetensors").is_file()
    assert json.loads((pruned / "config.json").read_text())["model_args"]["mlp_ratio"] == 1  # timm's hub config
    assert (pruned / "README.md").is_file()
    assert not list(pruned.parent.glob(".*tmp*"))  # no temp dirs left
    model = dgmr.load(pruned)
    assert model.blocks[0].mlp.fc1.out_features == 192
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_prune_json_summary(cli, tmp_path):
    code, out, err = cli("prune", *TINY, "--mlp-ratio", "0.5", "--criterion", "l2", "--dtype", "bfloat16",
                         "--out", str(tmp_path / "o"), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["hidden_after"] == [96] and res["criterion"] == "l2"
    assert 0 < res["param_reduction"] < 1 and res["params_after"] < res["params_before"]
    assert dgmr.load(tmp_path / "o").blocks[0].mlp.fc1.weight.dtype == torch.bfloat16


def test_prune_a_pruned_dir_again(cli, pruned, tmp_path):
    code, out, err = cli("prune", str(pruned), "--keep-fraction", "0.5", "--out", str(tmp_path / "again"), "--json")
    assert code == 0, err
    assert json.loads(out)["hidden_after"] == [96]
    assert dgmr.load(tmp_path / "again").blocks[1].mlp.fc2.in_features == 96


def test_stats_json(cli, pruned):
    code, out, err = cli("stats", *[a for a in TINY if a != "--random-init"], "--mlp-ratio", "1", "--json")
    assert code == 0, err
    s = json.loads(out)
    for key in ("params_before", "params_after", "param_reduction", "flops_before", "flops_after", "flop_reduction"):
        assert key in s
    assert 0 < s["param_reduction"] < 1 and 0 < s["flop_reduction"] < 1
    # the same numbers for the directory dgmr prune wrote
    code, out, err = cli("stats", str(pruned), "--json")
    d = json.loads(out)
    assert code == 0 and d["params_after"] == s["params_after"] and d["flops_after"] == s["flops_after"]
    # and params_after is what the saved model really holds in its vision tower
    assert d["params_after"] == sum(p.numel() for p in dgmr.load(pruned).parameters())


def _one_line_error(code, out, err, needle):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("dgmr: error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["prune", "resnet50", "--mlp-ratio", "1"], "unknown model spec"),
    (["prune", "foo:bar", "--mlp-ratio", "1"], "unknown model spec"),
    (["prune", "timm:not_a_model_xyz", "--random-init", "--mlp-ratio", "1"], "unknown timm model"),
    (["prune", "open_clip:Not-An-Arch", "--random-init", "--mlp-ratio", "1"], "unknown open_clip architecture"),
    (["prune", *TINY, "--mlp-ratio", "9"], "cannot keep"),
    (["prune", *TINY, "--mlp-ratio", "0"], "must be > 0"),
    (["prune", *TINY, "--mlp-ratio", "-1"], "must be > 0"),
    (["prune", *TINY], "--mlp-ratio"),
    (["prune", *TINY, "--hidden", "5000"], "cannot keep"),
    (["prune", *TINY, "--keep-fraction", "1.5"], "keep fraction"),
    (["prune", "timm:resnet18", "--random-init", "--mlp-ratio", "1"], "no MLP found"),
])
def test_user_mistakes(cli, tmp_path, argv, needle):
    out_dir = tmp_path / "out"
    code, out, err = cli(*argv, "--out", str(out_dir))
    _one_line_error(code, out, err, needle)
    assert not out_dir.exists() and not list(tmp_path.glob(".*"))


def test_hub_unreachable_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli("prune", "hf:no-such-org/no-such-model", "--mlp-ratio", "1", "--out", str(tmp_path / "o"))
    _one_line_error(code, out, err, "could not build")
    assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_overwrite(cli, tmp_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, out, err = cli("prune", *TINY, "--mlp-ratio", "1", "--out", str(out_dir))
    _one_line_error(code, out, err, "not empty")
    assert (out_dir / "keep.txt").read_text() == "mine"
    code, out, err = cli("prune", *TINY, "--mlp-ratio", "1", "--out", str(out_dir), "--overwrite")
    assert code == 0 and not (out_dir / "keep.txt").exists() and (out_dir / "dgmr.json").exists()


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_checkpoint(cli, pruned, tmp_path):
    missing = _copy(pruned, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    code, out, err = cli("prune", str(missing), "--mlp-ratio", "0.5", "--out", str(tmp_path / "o1"))
    _one_line_error(code, out, err, "missing checkpoint")

    corrupt = _copy(pruned, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, out, err = cli("prune", str(corrupt), "--mlp-ratio", "0.5", "--out", str(tmp_path / "o2"))
    _one_line_error(code, out, err, "corrupt")

    garbage = _copy(pruned, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    code, out, err = cli("prune", str(garbage), "--mlp-ratio", "0.5", "--out", str(tmp_path / "o3"))
    _one_line_error(code, out, err, "corrupt")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_mismatched_checkpoint_and_unknown_family(cli, pruned, tmp_path):
    wrong = _copy(pruned, tmp_path / "wrong")
    cfg = json.loads((wrong / "dgmr.json").read_text())
    cfg["widths"] = {k: 100 for k in cfg["widths"]}
    (wrong / "dgmr.json").write_text(json.dumps(cfg))
    code, out, err = cli("stats", str(wrong))
    assert code == 0  # stats reads shapes only
    code, out, err = cli("prune", str(wrong), "--mlp-ratio", "0.25", "--out", str(tmp_path / "o"))
    _one_line_error(code, out, err, "does not match")

    fam = _copy(pruned, tmp_path / "fam")
    cfg = json.loads((fam / "dgmr.json").read_text())
    cfg["family"] = "martian"
    (fam / "dgmr.json").write_text(json.dumps(cfg))
    code, out, err = cli("prune", str(fam), "--mlp-ratio", "0.5", "--out", str(tmp_path / "o2"))
    _one_line_error(code, out, err, "unknown family")


def test_plain_directory_is_not_a_model(cli, tmp_path):
    code, out, err = cli("stats", str(tmp_path))
    _one_line_error(code, out, err, "not a dgmr model directory")


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "prune" in out and "stats" in out
