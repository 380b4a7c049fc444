"""Evaluation settings (dgmr.evaluate.settings): one dataclass per group of settings is at
once the ``dgmr eval`` flags and the ``eval_*`` keywords, so the CLI's defaults are the
dataclasses', the older Python keywords still work and a misspelt one is a TypeError."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from dgmr.cli import _parser, main, parse
from dgmr.cli.settings import flag, given
from dgmr.core.errors import DgmrError
from dgmr.evaluate import eval_knn, eval_linear, eval_retrieval, eval_speed, eval_zeroshot, tasks
from dgmr.evaluate.settings import (FeatureSettings, KnnSettings, LinearSettings, RetrievalSettings, SpeedSettings,
                                    ZeroshotSettings, resolve)

from helpers import MeanColor, image_folder

# each command: its argv (required inputs only), the eval function the CLI calls and the
# settings classes (keyword of that function -> class)
COMMANDS = {
    "knn": (["M", "--train", "a", "--val", "b"], "eval_knn", {"knn": KnnSettings, "features": FeatureSettings}),
    "linear": (["M", "--train", "a", "--val", "b"], "eval_linear",
               {"linear": LinearSettings, "features": FeatureSettings}),
    "zeroshot": (["M", "--data", "d"], "eval_zeroshot", {"zeroshot": ZeroshotSettings, "features": FeatureSettings}),
    "retrieval": (["M", "--captions", "c", "--images", "i"], "eval_retrieval",
                  {"retrieval": RetrievalSettings, "features": FeatureSettings}),
    "speed": (["M1", "M2"], "eval_speed", {"speed": SpeedSettings}),
}


def _eval_parsers() -> dict[str, argparse.ArgumentParser]:
    top = _parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    ev = sub.choices["eval"]
    return next(a for a in ev._actions if isinstance(a, argparse._SubParsersAction)).choices


def _record(monkeypatch, name: str) -> dict:
    """Replace ``tasks.<name>`` (the function the CLI calls) by one that records its call."""
    seen: dict = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        return {"model": "m"}

    monkeypatch.setattr(tasks, name, fake)
    return seen


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# -- (a) the CLI's defaults are the dataclasses' -------------------------------------------
def test_knn_flags_parse_to_the_dataclass_defaults():
    args = parse(_parser(), ["eval", "knn", "M", "--train", "a", "--val", "b"])
    assert FeatureSettings(**given(args, FeatureSettings)) == FeatureSettings()
    assert KnnSettings(**given(args, KnnSettings)) == KnnSettings()
    assert given(args, FeatureSettings) == {} and given(args, KnnSettings) == {}  # no flag given: no value
    assert KnnSettings().k == [10, 20, 100, 200] and KnnSettings().temperature == 0.07
    assert FeatureSettings().batch_size == 64 and FeatureSettings().workers == 0 and FeatureSettings().cache


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_passes_the_dataclass_defaults(command, monkeypatch, capsys):
    argv, function, classes = COMMANDS[command]
    seen = _record(monkeypatch, function)
    assert main(["eval", command, *argv]) == 0
    for keyword, cls in classes.items():
        expected = cls(progress=True) if cls is FeatureSettings else cls()  # progress bars unless --json
        assert seen[keyword] == expected, keyword
    assert main(["eval", command, *argv, "--json"]) == 0
    if "features" in classes:
        assert seen["features"].progress is False


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_the_dataclass_defaults(command):
    p = _eval_parsers()[command]
    actions = {a.dest: a for a in p._actions}
    for cls in COMMANDS[command][2].values():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                assert f.name not in actions  # a Python-only setting is no flag
                continue
            a = actions[f.name]
            assert a.default is None and flag(f) in a.option_strings  # not given: the dataclass's default
            default = getattr(cls(), f.name)
            if default is not None and not isinstance(default, bool):
                assert f"(default: {_shown(default)})" in a.help, (command, f.name)


def test_cli_flags_reach_the_settings(monkeypatch, capsys):
    seen = _record(monkeypatch, "eval_knn")
    assert main(["eval", "knn", "M", "--train", "a", "--val", "b", "--k", "1,3", "--temperature", "0.5",
                 "--no-cache", "--workers", "2", "--batch-size", "8", "--crop-pct", "0.875"]) == 0
    assert seen["knn"] == KnnSettings(k=[1, 3], temperature=0.5)
    f = seen["features"]
    assert (f.cache, f.cache_root, f.workers, f.batch_size, f.crop_pct) == (False, False, 2, 8, 0.875)
    seen = _record(monkeypatch, "eval_linear")
    assert main(["eval", "linear", "M", "--train", "a", "--val", "b", "--held-out", "0", "--protocol",
                 "clip_benchmark", "--weight-decays", "0.1,1"]) == 0
    assert seen["linear"] == LinearSettings(held_out=0.0, protocol="clip_benchmark", weight_decays=[0.1, 1.0])
    seen = _record(monkeypatch, "eval_speed")
    assert main(["eval", "speed", "A", "B", "--label", "a,b", "--repeats", "2"]) == 0
    assert seen["speed"].label == ["a", "b"] and seen["speed"].repeats == 2 and seen["args"] == (["A", "B"],)


# -- (b) an unknown keyword is Python's TypeError ---------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: eval_knn("timm:nope", "a", "b", bogus=1),
    lambda: eval_knn("timm:nope", "a", "b", ties="expected"),  # another protocol's setting
    lambda: eval_linear("timm:nope", "a", "b", bogus=1),
    lambda: eval_zeroshot("timm:nope", "d", bogus=1),
    lambda: eval_retrieval("timm:nope", "c", "i", bogus=1),
    lambda: eval_speed(["timm:nope"], bogus=1),
])
def test_unknown_keyword_is_a_type_error(call):
    with pytest.raises(TypeError, match=r"eval_\w+\(\) got an unexpected keyword argument '(bogus|ties)'"):
        call()


def test_keyword_and_its_alias_together_or_a_wrong_object_is_a_type_error():
    with pytest.raises(TypeError, match="multiple values for keyword argument 'k'"):
        eval_knn("timm:nope", "a", "b", k=[1], ks=[1])
    with pytest.raises(TypeError, match="expects a FeatureSettings"):
        eval_knn("timm:nope", "a", "b", features=KnnSettings())


# -- (c) the older keywords are aliases -----------------------------------------------------
@pytest.mark.parametrize("function, classes, old, new", [
    ("eval_knn", (KnnSettings, FeatureSettings), {"ks": (1, 3), "num_workers": 2}, {"k": (1, 3), "workers": 2}),
    ("eval_linear", (LinearSettings, FeatureSettings), {"val_fraction": 0.3}, {"held_out": 0.3}),
    ("eval_retrieval", (RetrievalSettings, FeatureSettings), {"ks": [2]}, {"k": [2]}),
    ("eval_speed", (SpeedSettings,), {"labels": ["a", "b"]}, {"label": ["a", "b"]}),
])
def test_alias_keywords_give_the_same_settings(function, classes, old, new):
    from_old = resolve(function, old, *((c, None) for c in classes))
    from_new = resolve(function, new, *((c, None) for c in classes))
    assert from_old == from_new
    assert from_old != [c() for c in classes]  # the value was taken, not dropped


def test_alias_keywords_reach_the_protocols(monkeypatch):
    seen: dict = {}
    feats = torch.eye(4), torch.arange(4), torch.eye(4), torch.arange(4)

    def fake_features(model, train, val, s, kind="pooled"):
        seen["features"] = s
        return {}, (*feats, "cpu"), 4

    monkeypatch.setattr(tasks, "_classification_features", fake_features)
    monkeypatch.setattr(tasks, "knn_classify", lambda *a, **kw: seen.update(knn=kw) or {})
    monkeypatch.setattr(tasks, "linear_probe", lambda *a, **kw: seen.update(linear=kw) or {})
    eval_knn("M", "a", "b", ks=(1, 3), num_workers=2, cache_dir=False)
    old = seen["knn"]["ks"], seen["features"]
    eval_knn("M", "a", "b", k=(1, 3), workers=2, cache=False)
    assert (seen["knn"]["ks"], seen["features"]) == old and old[0] == (1, 3) and old[1].workers == 2
    assert old[1].cache is False  # cache_dir=False (the older way) is cache=False
    eval_linear("M", "a", "b", val_fraction=0.3)
    assert seen["linear"]["val_fraction"] == 0.3
    eval_linear("M", "a", "b", linear=LinearSettings(held_out=0.4, seed=3), held_out=0.25)  # keywords override
    assert seen["linear"]["val_fraction"] == 0.25 and seen["linear"]["seed"] == 3


def test_alias_keywords_give_the_same_result(tmp_path):
    image_folder(tmp_path / "train", {"red": (220, 30, 30), "blue": (30, 40, 220)}, 3, seed=0, jitter=20)
    image_folder(tmp_path / "val", {"red": (220, 30, 30), "blue": (30, 40, 220)}, 2, seed=1, jitter=20)
    old = eval_knn(MeanColor(), tmp_path / "train", tmp_path / "val", ks=(1, 3), num_workers=0, image_size=16,
                   cache_dir=False)
    new = eval_knn(MeanColor(), tmp_path / "train", tmp_path / "val", features=FeatureSettings(image_size=16, cache=False),
                   k=[1, 3])
    assert set(old["per_k"]) == {"1", "3"} and old["per_k"] == new["per_k"] and old["top1"] == new["top1"] == 1.0
    assert old["cache"]["dir"] is None and new["cache"]["dir"] is None


# -- validation lives in the dataclasses, before any model is opened ------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: FeatureSettings(batch_size=0), "--batch-size must be >= 1"),
    (lambda: FeatureSettings(image_size=0), "--image-size must be >= 1"),
    (lambda: FeatureSettings(crop_pct=1.5), "--crop-pct must be in (0, 1]"),
    (lambda: FeatureSettings(workers=-1), "--workers must be >= 0"),
    (lambda: LinearSettings(held_out=0), "--held-out must be in (0, 1)"),
    (lambda: LinearSettings(lr=0), "--lr must be > 0"),
    (lambda: LinearSettings(protocol="sgd"), "unknown linear-probe protocol 'sgd'"),
    (lambda: RetrievalSettings(k=[0]), "K must be >= 1"),
    (lambda: RetrievalSettings(ties="random"), "unknown tie rule"),
    (lambda: SpeedSettings(repeats=0), "--batch-size and --repeats must be >= 1"),
    (lambda: eval_knn("timm:not-a-model", "a", "b", batch_size=0), "--batch-size must be >= 1"),
])
def test_settings_are_checked_when_made(make, message):
    with pytest.raises(DgmrError) as e:
        make()
    assert message in str(e.value)


def test_settings_that_are_allowed():
    assert LinearSettings(held_out=0, protocol="clip_benchmark").held_out == 0  # no weight-decay search
    assert SpeedSettings(label="a,b").label == ["a", "b"]  # the flag's comma-separated form
    s = FeatureSettings(cache_dir=False)
    assert (s.cache, s.cache_dir, s.cache_root) == (False, None, False)
    assert FeatureSettings(cache_dir=True).cache_root is None and FeatureSettings(cache_dir="x").cache_root == "x"


# -- (d) help texts ---------------------------------------------------------------------------
def test_knn_help_shows_the_off_text_and_the_required_inputs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "knn", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    assert "--no-cache do not read or write cached features" in text
    assert "--train TRAIN training split (root/CLASS/IMAGE) (required)" in text
    assert "--val VAL evaluation split (root/CLASS/IMAGE) (required)" in text
    assert "[--train" not in text and "--train TRAIN" in out.split("\n\n")[0]  # the usage line: not optional
    assert "--progress" not in text and "--text-batch-size" not in text  # Python-only settings


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_its_own_help(command):
    p = _eval_parsers()[command]
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help and a.help.strip(), a.option_strings or a.dest
        if a.required and a.option_strings:
            assert a.help.endswith("(required)"), a.option_strings
        if isinstance(a, argparse._StoreFalseAction):  # a --no-X flag says what it turns off
            assert a.option_strings[0].startswith("--no-") and not a.help.startswith("turn off:")
