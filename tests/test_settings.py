"""One source per setting: the prune, stats and calibration flags are generated from their
settings dataclasses, the Python keywords carry the flags' names, and the command line words
its help, its errors and its numbers for people."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import dgmr
from dgmr.cli import _parser, format_number, parse
from dgmr.prune.calibration.settings import CalibrationSettings
from dgmr.prune.settings import PruneSettings, StreamSettings

from helpers import TINY_VIT_ARGV


def _namespace(*argv: str):
    return parse(_parser(), ["prune", *argv])


@pytest.mark.parametrize("cls", [PruneSettings, StreamSettings, CalibrationSettings])
def test_prune_flags_default_to_the_dataclass(cls):
    """Every generated flag leaves its setting's default: a prune given nothing but MODEL and
    --out builds the dataclass's own defaults (none repeated in the CLI)."""
    args = _namespace("timm:x", "--out", "o")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    assert given and all(v is None for v in given.values()), given
    assert cls(**{k: v for k, v in given.items() if v is not None}) == cls()


def test_each_calibration_flag_sets_its_field():
    args = _namespace("timm:x", "--out", "o", "--calibration", "d", "--calibration-images", "8", "--no-compensation",
                      "--allocate", "global", "--ridge", "0.01", "--allocate-floor", "0.25", "--allocate-ceiling", "3",
                      "--calibration-batch-size", "4", "--calibration-device", "cpu", "--calibration-precision", "fp32",
                      "--no-calibration-sweep")
    s = CalibrationSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CalibrationSettings)})
    assert s == CalibrationSettings(calibration_images=8, compensation=False, allocate="global", ridge=0.01,
                                    allocate_floor=0.25, allocate_ceiling=3.0, calibration_batch_size=4,
                                    calibration_device="cpu", calibration_precision="fp32", calibration_sweep=False)


def test_python_keywords_are_the_flag_names(tmp_path):
    """``dgmr.prune(..., calibration_images=N)`` as ``--calibration-images N``; the older
    keyword still works, with a FutureWarning naming the new one, and gives the same settings."""
    new = CalibrationSettings.from_keywords(calibration_images=32, compensation=False, allocate_floor=0.3)
    with pytest.warns(FutureWarning, match="calibration_images"):
        old = CalibrationSettings.from_keywords(images=32, compensate=False, floor=0.3)
    assert new == old and new.calibration_images == 32
    with pytest.raises(TypeError, match="unexpected keyword argument 'image'"):
        CalibrationSettings.from_keywords(image=32)
    with pytest.raises(TypeError, match="twice"):
        CalibrationSettings.from_keywords(images=3, calibration_images=4)
    model = dgmr.build_model(dgmr.parse_spec("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8,
                                                                             "depth": 1}), pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name takes no detour
        _, rec = dgmr.prune(model, mlp_ratio=1.0, calibration=torch.rand(8, 3, 32, 32), calibration_images=6,
                            progress=False)
    assert rec.calibration["images"] == 6  # the record keeps its field names (file format unchanged)


def test_prune_to_dir_takes_settings_or_keywords(tmp_path):
    from dgmr.prune.to_dir import prune_to_dir

    kw = dict(random_init=True, hidden=16, criterion="l2", seed=3)
    a = prune_to_dir("timm:vit_tiny_patch16_224", tmp_path / "a", model_kwargs={"img_size": 32, "patch_size": 8,
                                                                                 "depth": 1}, progress=False, **kw)
    b = prune_to_dir("timm:vit_tiny_patch16_224", tmp_path / "b", PruneSettings(**kw),
                     model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1}, progress=False)
    assert a["hidden_after"] == b["hidden_after"] == [16] and a["criterion"] == "l2"
    # --random-init weights come from --seed: the same command builds the same model
    ta, tb = dgmr.load(tmp_path / "a").state_dict(), dgmr.load(tmp_path / "b").state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(TypeError, match="unexpected keyword argument 'hiden'"):
        prune_to_dir("timm:vit_tiny_patch16_224", tmp_path / "c", hiden=3)


def test_help_is_written_for_each_flag():
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    helps = {o: a.help for a in sub._actions for o in a.option_strings}
    assert helps["--no-compensation"].startswith("do not refit")  # says what the flag turns off
    assert helps["--no-native"].startswith("skip the export")
    assert helps["--out"].endswith("(required)")
    assert helps["--calibration-images"].endswith("(default: 256)")


def test_mistyped_flag_gets_the_subcommands_usage_and_a_suggestion(capsys, tmp_path):
    """argparse's own usage errors exit with 2 (SystemExit), from the sub-command's parser."""
    from dgmr.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prune", *TINY_VIT_ARGV, "--mlp-ratoi", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: dgmr prune") and "did you mean --mlp-ratio?" in err
    with pytest.raises(SystemExit):
        main(["eval", "knn", "m", "--train", "a", "--val", "b", "--temprature", "3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: dgmr eval knn") and "did you mean --temperature?" in err


@pytest.mark.parametrize("flag", ["--mlp-ratio", "--ridge", "--allocate-floor"])
def test_float_flags_refuse_inf_and_nan(cli, tmp_path, flag):
    code, _, err = cli("prune", *TINY_VIT_ARGV, flag, "inf", "--out", tmp_path / "o")
    assert code == 2 and f"{flag} must be a finite number" in err and "Traceback" not in err


def test_small_numbers_are_printed_visibly():
    assert format_number(6.25e-06) == "6.25e-06"
    assert format_number(1e-05) == "1e-05"
    assert format_number(0.0) == "0.0000"
    assert format_number(0.5) == "0.5000"
