"""One error line and exit 2 where a traceback was (docs/failures.md): out of memory (a real
``RLIMIT_AS``), too many open files (a real ``RLIMIT_NOFILE``), weight dtypes and kept indices
checked, quiet DataLoader workers on SIGTERM, skipped dataset entries counted, feature cache
entries checked when read, seeded ``--random-init`` everywhere, made-up open_clip tags refused."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dgmr
from dgmr.core.errors import DgmrError
from dgmr.evaluate.features import FeatureCache, cache_key
from dgmr.evaluate.tasks import open_eval_model
from dgmr.evaluate.settings import ModelSettings
from dgmr.models.artifact import INDICES, RECORD, load_kept_indices, record_file

from helpers import CHILD_ENV as ENV, TINY_VIT_ARGV, TINY_VIT_KWARGS, TINY_VIT_SPEC, image_folder, tiny_run_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
KW = json.dumps(TINY_VIT_KWARGS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return tiny_run_inputs(tmp_path_factory.mktemp("errors"), 4)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    return proc.stderr.replace("\r", "\n").strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# out of memory: the address space is capped for real just before the selection / the refit
OOM_CHILD = textwrap.dedent("""
    import importlib, resource, sys
    from dgmr.cli import main

    def capped(fn):
        def wrapper(*a, **kw):
            vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 18), hard))  # 256 KiB more than now
            try:
                return fn(*a, **kw)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return wrapper

    prune, refit = importlib.import_module("dgmr.prune"), importlib.import_module("dgmr.prune.calibration.refit")
    prune.select_neurons = capped(prune.select_neurons)  # the weights-only selection
    prune.select_heads = capped(prune.select_heads)  # the head selection (--heads)
    refit.refit_down = capped(refit.refit_down)  # the calibrated refit (of every site kind)
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads VmSize from /proc")
def test_out_of_memory_in_selection_and_refit_names_the_layer(tmp_path):
    image_folder(tmp_path / "cal", ["a"], 8, style="noise", size=(32, 32))
    base = [sys.executable, "-c", OOM_CHILD, "prune", *TINY_VIT_ARGV, "--mlp-ratio", "2", "--json"]
    proc = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("dgmr: error: blocks.0.mlp: out of memory selecting 384 of 768 neurons "), line
    assert "it needs about " in line and "MiB" in line and "failed" in line, line
    proc = subprocess.run([*base, "--criterion", "l2", "--calibration", str(tmp_path / "cal"), "--calibration-images",
                           "8", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("dgmr: error: blocks.0.mlp: out of memory calibrating it"), line
    assert "it needs about " in line, line
    proc = subprocess.run([*base[:-3], "--heads", "2", "--json", "--out", str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("dgmr: error: blocks.0.attn: out of memory cutting it to 2 heads: it needs about "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal"]  # no output, no lock file


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_NOFILE as Linux counts it")
def test_too_many_open_files_in_eval_workers_is_one_line(tiny, tmp_path):
    import resource

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    image_folder(tmp_path / "imgs", ["a", "b"], 60, style="noise", size=(16, 16))
    proc = subprocess.run([sys.executable, "-m", "dgmr.cli", "eval", "knn", str(tiny["student"]), "--train",
                           str(tmp_path / "imgs"), "--val", str(tmp_path / "imgs"), "--workers", "2", "--batch-size",
                           "2", "--no-cache", "--device", "cpu", "--json"], capture_output=True, text=True,
                          timeout=300, env=ENV, preexec_fn=few_files)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("dgmr: error: too many open files while reading the images (the limit is 100"), line
    assert "--workers" in line, line


# ---------------------------------------------------------------------------------------------
# DataLoader workers and SIGTERM
TERM_CHILD = textwrap.dedent("""
    import os, signal, sys
    from dgmr.cli import main
    from dgmr.data.labeled import ImageFolderSplit

    item = ImageFolderSplit.__getitem__
    def getitem(self, i):  # in a worker: the whole process group gets SIGTERM, as SLURM sends it
        if i == 5:
            os.killpg(os.getpgid(0), signal.SIGTERM)
        return item(self, i)
    ImageFolderSplit.__getitem__ = getitem
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_with_dataloader_workers_is_one_quiet_line(tiny):
    proc = subprocess.run([sys.executable, "-c", TERM_CHILD, "eval", "knn", str(tiny["student"]), "--train",
                           str(tiny["images"]), "--val", str(tiny["images"]), "--workers", "2", "--batch-size", "1",
                           "--no-cache", "--device", "cpu", "--json"], capture_output=True, text=True, timeout=300,
                          env=ENV, start_new_session=True)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr == "dgmr: terminated by SIGTERM; temporary output removed\n", proc.stderr  # no worker trace


HANDOVER_CHILD = textwrap.dedent("""
    import os, socket, sys, time
    from multiprocessing import resource_sharer
    from dgmr.core.signals import ignore_stop_signals

    ignore_stop_signals(0)  # the workers' worker_init_fn
    r, w = os.pipe()
    address, _ = resource_sharer.DupFd(r)._id  # how a worker hands a tensor's descriptor to the main process
    s = socket.socket(socket.AF_UNIX)
    s.connect(address)  # the main process connects, and is stopped by the signal in the handshake
    s.close()
    time.sleep(0.5)  # the sharer's thread fails on the broken connection now
    try:
        raise BrokenPipeError(32, "Broken pipe")  # anything else is reported as before
    except OSError:
        sys.excepthook(*sys.exc_info())
""")


def test_a_worker_handing_over_a_batch_to_a_stopped_main_process_is_quiet():
    """The race behind a rare worker trace on SIGTERM (multiprocessing's resource sharer calls
    sys.excepthook when the main process dies mid-handshake), made certain."""
    proc = subprocess.run([sys.executable, "-c", HANDOVER_CHILD], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Traceback") == 1 and "resource_sharer" not in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith("BrokenPipeError: [Errno 32] Broken pipe"), proc.stderr


# ---------------------------------------------------------------------------------------------
# what is read back is checked


def test_only_supported_weight_dtypes(tiny, tmp_path, cli):
    out = tmp_path / "m"
    shutil.copytree(tiny["student"], out)
    record = record_file(out)  # dgmr's record (dgmr.json): config.json is the library's own
    assert record == out / RECORD
    cfg = json.loads(record.read_text())
    for bad in ("float8_e4m3fn", "complex64", "int8", 3):
        record.write_text(json.dumps({**cfg, "dtype": bad}))
        code, _, err = cli("eval", "speed", out, "--repeats", "1", "--warmup", "0", "--batch-size", "1")
        assert code == 2 and err.count("\n") == 1 and f"{record}: dtype " in err, err
    model = dgmr.load(tiny["student"]).to(torch.float8_e4m3fn)
    with pytest.raises(DgmrError, match="cannot save .* in float8_e4m3fn: dgmr loads weights in float32"):
        dgmr.save(model, tmp_path / "f8")
    assert not (tmp_path / "f8").exists()
    record.write_text(json.dumps({**cfg, "dtype": "float64"}))  # a checkpoint's float64 is fine
    assert next(dgmr.load(out).parameters()).dtype == torch.float64


@pytest.mark.parametrize("bad, problem", [
    (lambda k: {**k, "blocks.0.mlp": k["blocks.0.mlp"][:-1]}, "holds 191 indices for a width of 192"),
    (lambda k: {**k, "blocks.0.mlp": k["blocks.0.mlp"] + 1000}, "outside [0, 768)"),
    (lambda k: {**k, "blocks.0.mlp": torch.zeros(192, dtype=torch.long)}, "holds an index twice"),
    (lambda k: {**k, "blocks.0.mlp": k["blocks.0.mlp"].float()}, "must be a 1-D integer tensor"),
    (lambda k: {**k, "blocks.9.mlp": k["blocks.0.mlp"]}, "'blocks.9.mlp' names no MLP or attention layer of the model"),
])
def test_kept_indices_are_checked_before_a_run_copies_them(tiny, tmp_path, cli, bad, problem):
    student = tmp_path / "student"
    shutil.copytree(tiny["student"], student)  # its dgmr.json records the prune: hidden_before 768
    save_file({k: v.clone() for k, v in bad(load_kept_indices(student)).items()}, str(student / INDICES))
    code, _, err = cli("distill", "--teacher", tiny["teacher"], "--student", student, "--data", tiny["images"],
                       "--out", tmp_path / "run", "--steps", "1", "--batch-size", "4", "--workers", "0",
                       "--device", "cpu", "--no-progress", "--no-tensorboard")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dgmr: error: {student / INDICES}: ") and problem in err, err
    assert not (tmp_path / "run").exists()


def test_kept_heads_are_checked_beside_the_kept_neurons(tiny, tmp_path):
    """A prune that removed heads records each attention layer's kept heads in the same file,
    under the attention module's name: checked against dgmr.json's head counts."""
    student = tmp_path / "student"
    model, record = dgmr.prune(dgmr.load(tiny["teacher"]), mlp_ratio=1, heads=2, progress=False)
    dgmr.save(model, student, record=record)
    kept = load_kept_indices(student)  # a good file passes, heads and all
    assert kept["blocks.0.attn"].tolist() == record.kept_heads["blocks.0.attn"].tolist() and len(kept) == 4
    for bad, problem in (({"blocks.0.attn": torch.tensor([0, 1, 2])}, "holds 3 indices for a head count of 2"),
                         ({"blocks.0.attn": torch.tensor([0, 3])}, "outside [0, 3)"),
                         ({"blocks.1.attn": torch.tensor([1, 1])}, "holds an index twice")):
        save_file({**{k: v.clone() for k, v in kept.items()}, **bad}, str(student / INDICES))
        with pytest.raises(DgmrError, match=f"{INDICES}: .*{re.escape(problem)}"):
            load_kept_indices(student)


def test_skipped_dataset_entries_are_counted_as_unreadable(tiny, tmp_path, cli):
    """A link to a device, a dangling link and a FIFO named like images used to vanish from the
    listing uncounted: they are listed, and their reads fail with the reason, like a corrupt image."""
    images = tmp_path / "images"
    image_folder(images, ["a", "b"], 4, style="noise", size=(36, 36))
    (images / "a" / "zero.png").symlink_to("/dev/zero")
    (images / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(images / "b" / "pipe.png")
    (images / "b" / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not an image: an ignored file
    code, out, err = cli("distill", "--teacher", tiny["teacher"], "--student", tiny["student"], "--data", images,
                         "--out", tmp_path / "run", "--steps", "2", "--batch-size", "11", "--workers", "0",
                         "--device", "cpu", "--no-progress", "--no-tensorboard", "--json",
                         "--val-fraction", "0")  # every entry goes through the training stream
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ignored_files"] == 1 and summary["unreadable_images"] == 3, summary
    reasons = " ".join(summary["unreadable_examples"])
    assert "zero.png: not a regular file" in reasons and "pipe.png: not a regular file" in reasons, reasons
    assert "gone.png: cannot open the image file: No such file or directory" in reasons, reasons
    # an evaluation split never opens them either: counted in the result, with a warning
    with pytest.warns(UserWarning, match="skipped 3 entries named like images that are not regular files"):
        code, out, err = cli("eval", "knn", tiny["student"], "--train", images, "--val", images, "--no-cache", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["skipped_files"] == 6 and res["n_test"] == 8, res  # both splits are the same folder
    assert any(e.endswith("zero.png: a character device") for e in res["skipped_examples"]), res
    assert any(e.endswith("gone.png: a dangling symbolic link") for e in res["skipped_examples"]), res


def test_feature_cache_entries_are_checked_when_read(tmp_path):
    """A NaN entry of the right shape used to change the kNN top-1 silently."""
    cache = FeatureCache(tmp_path)
    key_parts = {"model": "m", "data": "d", "n": "3"}
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12.).reshape(3, 4), torch.arange(3)

    cache.features(key_parts, compute)
    key = cache_key(*(f"{k}={v}" for k, v in sorted(key_parts.items())))
    entry = tmp_path / f"{key}.safetensors"
    meta = {"dgmr_cache_key": key}
    bad_entries = [
        ({"features": torch.full((3, 4), float("nan")), "labels": torch.arange(3)}, meta, "3 NaN|12 NaN"),
        ({"features": torch.ones(2, 4), "labels": torch.arange(2)}, meta, "for 3 images"),
        ({"features": torch.ones(3, 4, dtype=torch.float16), "labels": torch.arange(3)}, meta, "float16"),
        ({"features": torch.ones(3, 4), "labels": torch.arange(3)}, {"dgmr_cache_key": "0" * 32}, "claims the key"),
        ({"features": torch.ones(3, 4), "labels": torch.arange(3)}, None, "records no key"),
    ]
    for tensors, metadata, reason in bad_entries:
        save_file(tensors, str(entry), metadata=metadata)
        with pytest.warns(UserWarning, match=f"feature cache entry .* is unusable \\(.*({reason}).*computing"):
            feats, labels = cache.features(key_parts, compute)
        assert torch.equal(feats, torch.arange(12.).reshape(3, 4)) and torch.equal(labels, torch.arange(3))
    entry.write_bytes(entry.read_bytes()[:40])  # cut short
    with pytest.warns(UserWarning, match="is unusable"):
        cache.features(key_parts, compute)
    assert len(calls) == 1 + len(bad_entries) + 1
    cache.features(key_parts, compute)  # each bad entry was replaced by a good one: a hit now
    assert len(calls) == 1 + len(bad_entries) + 1 and cache.hits >= 1


# ---------------------------------------------------------------------------------------------
# --random-init


def test_every_random_init_is_seeded_and_recorded(tiny, tmp_path, cli):
    """prune and distill build --random-init weights from --seed (tests of their own); eval too now,
    and records the seed: the same command builds the same weights."""
    spec = dict(random_init=True, model_kwargs=TINY_VIT_KWARGS)
    a, _, info = open_eval_model(TINY_VIT_SPEC, ModelSettings(**spec, seed=3))
    b, _, _ = open_eval_model(TINY_VIT_SPEC, ModelSettings(**spec, seed=3))
    c, _, _ = open_eval_model(TINY_VIT_SPEC, ModelSettings(**spec, seed=4))
    assert info["random_init_seed"] == 3
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    for run in ("r1", "r2"):
        code, _, err = cli("eval", "knn", *TINY_VIT_ARGV, "--seed", "5", "--train", tiny["images"], "--val",
                           tiny["images"], "--no-cache", "--save", tmp_path / f"{run}.json", "--json")
        assert code == 0, err
    r1, r2 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in ("r1", "r2"))
    assert r1["random_init_seed"] == 5 and r1["top1"] == r2["top1"]
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--seed", "5", "--mlp-ratio", "1", "--out", tmp_path / "p")
    assert code == 0 and json.loads(record_file(tmp_path / "p").read_text())["random_init_seed"] == 5


def test_a_made_up_open_clip_tag_is_refused_even_with_random_init(tmp_path, cli):
    for argv in (("prune", "open_clip:ViT-B-32:made-up", "--random-init", "--mlp-ratio", "1", "--out", tmp_path / "o"),
                 ("eval", "speed", "open_clip:ViT-B-32:made-up", "--random-init"),
                 ("stats", "open_clip:ViT-B-32:made-up", "--mlp-ratio", "1")):
        code, _, err = cli(*argv)
        assert code == 2 and err.count("\n") == 1, err
        assert "unknown pretrained tag 'made-up' for open_clip:ViT-B-32: open_clip knows openai" in err, err
    assert list(tmp_path.iterdir()) == []
