"""Bad files at the boundary (dgmr.io.schema): a dgmr config.json, run_config.json, the distill
checkpoint, metrics.jsonl, config files, width flags, non-finite tensors. Each is one
``dgmr: error:`` line naming the file and the field; nothing is written."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import dgmr
from dgmr.core.errors import DgmrError
from dgmr.models.sources import build_model, parse_spec

from helpers import TINY_VIT_ARGV, TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder, tiny_teacher_student

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_error(code: int, err: str, *needles: str) -> str:
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 2 and line.startswith("dgmr: error: "), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in line, line
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher/student, 8 images, and a finished 2-step run to tamper with (copies)."""
    from dgmr.cli import main

    root = tmp_path_factory.mktemp("inputs")
    tiny_teacher_student(root)
    image_folder(root / "images", ["a", "b"], 4, style="noise", size=(36, 36))
    assert main(["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--data",
                 str(root / "images"), "--out", str(root / "run"), "--steps", "2", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard", "--log-every", "1"]) == 0
    return {"root": root, "teacher": root / "teacher", "student": root / "student", "run": root / "run"}


@pytest.mark.parametrize("change, field", [
    (lambda c: c.pop("widths"), "widths must be a JSON object"),
    (lambda c: c.pop("family"), "family must be a non-empty string"),
    (lambda c: c["widths"].update({next(iter(c["widths"])): "abc"}), "must be an integer, not 'abc'"),
    (lambda c: c["widths"].update({next(iter(c["widths"])): -3}), "must be in [1, 16777216], not -3"),
    (lambda c: c["widths"].update({next(iter(c["widths"])): 10**12}), "not 1000000000000"),
    (lambda c: c.update(weights=["x"]), "weights must be a non-empty string"),
    (lambda c: c.update(weights="../other/model.safetensors"), "weights must name a file inside the model directory"),
    (lambda c: c.update(dtype="float128"), "dtype 'float128' is not a float dtype"),
    (lambda c: c.update(dtype="int8"), "dtype 'int8' is not a float dtype"),
    (lambda c: c["source"].update(name=None), "source.name must be a non-empty string"),
])
def test_bad_model_config_is_one_error_naming_the_field(tiny, tmp_path, cli, change, field):
    model = tmp_path / "model"
    shutil.copytree(tiny["student"], model)
    cfg = json.loads((model / "dgmr.json").read_text())
    change(cfg)
    (model / "dgmr.json").write_text(json.dumps(cfg))
    _one_error(*cli("prune", model, "--mlp-ratio", "1", "--out", tmp_path / "out")[::2], str(model / "dgmr.json"),
               field)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DgmrError, match="dgmr.json"):
        dgmr.load(model)


def test_model_config_that_is_a_list_is_not_a_dgmr_directory(tiny, tmp_path, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny["student"], model)
    (model / "dgmr.json").write_text("[1, 2]")
    _one_error(*cli("prune", model, "--mlp-ratio", "1", "--out", tmp_path / "out")[::2], "not a dgmr model directory")


def _tampered_run(tiny, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    return run


def _resume(cli, run: Path) -> tuple[int, str, str]:
    return cli("distill", "--out", run, "--resume", "--steps", "2", "--no-progress")


def _edit_checkpoint(run: Path, **changes) -> None:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for k, v in changes.items():
        if v is None:
            ckpt.pop(k)
        else:
            ckpt[k] = v
    torch.save(ckpt, run / "checkpoint.pt")


@pytest.mark.parametrize("case, needles", [
    ("no run_config", ["cannot read the run's settings", "run_config.json"]),
    ("corrupt run_config", ["run_config.json is not valid JSON"]),
    ("run_config without settings", ["run_config.json: settings must be a JSON object"]),
    ("run_config a list", ["run_config.json: the file must be a JSON object"]),
    ("checkpoint without step", ["checkpoint.pt: step is missing"]),
    ("checkpoint step 10000", ["checkpoint.pt: step must be in [0, 2], not 10000"]),
    ("checkpoint step -5", ["checkpoint.pt: step must be in [0, 2], not -5"]),
    ("checkpoint step 1.5", ["checkpoint.pt: step must be an integer"]),
    ("metrics not UTF-8", ["metrics.jsonl:1: not a JSON line"]),
    ("metrics line a list", ["metrics.jsonl:2: the line must be a JSON object"]),
    ("student of another shape", ["does not fit the student", "size mismatch"]),
])
def test_bad_run_files_are_one_error_naming_the_field(tiny, tmp_path, cli, case, needles):
    run = _tampered_run(tiny, tmp_path)
    rc = run / "run_config.json"
    if case == "no run_config":
        rc.unlink()
    elif case == "corrupt run_config":
        rc.write_text('{"settings": ')
    elif case.startswith("run_config"):
        cfg = json.loads(rc.read_text())
        rc.write_text(json.dumps([cfg] if "list" in case else {k: v for k, v in cfg.items() if k != "settings"}))
    elif case.startswith("checkpoint"):
        step = case.rpartition(" ")[2]
        _edit_checkpoint(run, step=None if step == "step" else float(step) if "." in step else int(step))
    elif case == "metrics not UTF-8":
        (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": \xff}\n' + (run / "metrics.jsonl").read_bytes())
    elif case == "metrics line a list":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    elif case == "student of another shape":
        cfg = json.loads(rc.read_text())
        rc.write_text(json.dumps({**cfg, "student": str(tiny["teacher"])}))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _one_error(*_resume(cli, run)[::2], *needles)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dgmr-test-evil-ran",))


def test_pickled_code_in_a_checkpoint_is_refused_without_torch_advice(tiny, tmp_path, cli):
    run = _tampered_run(tiny, tmp_path)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["ema"] = _Evil()
    torch.save(ckpt, run / "checkpoint.pt")
    if os.path.exists("/tmp/dgmr-test-evil-ran"):
        os.unlink("/tmp/dgmr-test-evil-ran")
    line = _one_error(*_resume(cli, run)[::2], "holds Python objects dgmr does not unpickle", "system")
    assert "weights_only" not in line and "False" not in line
    assert not os.path.exists("/tmp/dgmr-test-evil-ran")


def test_config_file_must_be_a_small_regular_file(tiny, tmp_path, cli):
    os.mkfifo(tmp_path / "fifo.yaml")
    argv = ("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", tiny["root"] / "images",
            "--out", tmp_path / "run", "--device", "cpu", "--no-progress")
    _one_error(*cli(*argv, "--config", "/dev/zero")[::2], "/dev/zero is not a regular file")
    _one_error(*cli(*argv, "--config", tmp_path / "fifo.yaml")[::2], "fifo.yaml is not a regular file")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    _one_error(*cli(*argv, "--config", tmp_path / "bin.json")[::2], "is not UTF-8 text")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_width_flags_must_be_finite(tmp_path, cli, value):
    """(0 and -1 are the library's "must be > 0", tests/test_cli.py.)"""
    for command in ("prune", "stats"):
        for flag in ("--mlp-ratio", "--keep-fraction"):
            out = ["--out", str(tmp_path / "o")] if command == "prune" else []
            _one_error(*cli(command, *TINY_VIT_ARGV, f"{flag}={value}", *out)[::2],
                       f"{flag} must be a finite number, got '{value}'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, value", [("blocks.0.mlp.fc2.bias", float("nan")),
                                         ("blocks.1.attn.qkv.weight", float("inf")),
                                         ("blocks.0.mlp.fc1.bias", float("-inf"))])
def test_non_finite_tensors_are_never_written(tmp_path, cli, name, value):
    src = parse_spec(TINY_VIT_SPEC, TINY_VIT_KWARGS)
    model = build_model(src, pretrained=False)
    with torch.no_grad():
        model.get_parameter(name).fill_(value)  # every entry: whichever neurons the prune keeps
    with pytest.raises(DgmrError, match=rf"tensor {name} holds \d+ (NaN|infinite) value"):
        dgmr.save(model, tmp_path / "out", source=src)
    # the streaming prune (tensor by tensor from a checkpoint): refused too, no output, no temp
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    code, _, err = cli("prune", TINY_VIT_SPEC, "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--mlp-ratio", "1",
                       "--weights", tmp_path / "w.safetensors", "--out", tmp_path / "out")
    line = err.replace("\r", "\n").strip().splitlines()[-1]
    assert code == 2 and line.startswith("dgmr: error: ") and ("NaN" in line or "inf" in line), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.parametrize("text, message", [
    ("lr: abc", "setting lr must be a number, got 'abc'"),
    ("batch_size: 2.5", "setting batch_size must be a whole number, got 2.5"),
    ("betas: [0.9]", "setting betas must be 2 numbers"),
    ("steps: true", "setting steps must be a whole number, got True"),
    ("ema: 'yes'", "setting ema must be a number"),
])
def test_config_values_of_the_wrong_type_are_one_error(tiny, tmp_path, cli, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    code, _, err = cli("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data",
                       tiny["root"] / "images", "--out", tmp_path / "run", "--config", cfg)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_yaml_reads_1e_minus_4_as_text_and_the_setting_takes_it():
    from dgmr.distill.settings import DistillSettings

    assert DistillSettings.resolve({"lr": "1e-4", "steps": 2.0}).lr == 1e-4
