"""SIGTERM / SIGUSR1 (preemption) and what killed processes leave behind (docs/failures.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dgmr.cli import main
from dgmr.distill import distill, load_checkpoint
from dgmr.core.errors import EXIT_PREEMPTED, EXIT_TERMINATED, Preempted
from dgmr.io.output import remove_stale_temps

from helpers import TINY_VIT_ARGV, tiny_run_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return tiny_run_inputs(tmp_path_factory.mktemp("signals"), 6)


def _argv(tiny, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data",
            str(tiny["images"]), "--out", str(out), "--steps", "6", "--batch-size", "4", "--lr", "2e-3",
            "--log-every", "1", "--save-every", "100", "--device", "cpu", "--no-progress", "--no-tensorboard", *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# the CLI in a child of its own process group; during step 3 the whole group gets SIGTERM
# (as SLURM signals every process of a job), DataLoader worker included
SIGTERM_CHILD = textwrap.dedent("""
    import os, signal, sys
    from dgmr.cli import main
    from dgmr.distill.recipe import DistillRecipe

    step = DistillRecipe.train_step
    def train_step(self, batches):
        if self.state.step == 2:
            os.killpg(os.getpgid(0), signal.SIGTERM)
        return step(self, batches)
    DistillRecipe.train_step = train_step
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_checkpoints_the_step_and_resume_is_exact(tiny, tmp_path):
    ref = tmp_path / "ref"
    assert main(_argv(tiny, ref, "--workers", "0")) == 0
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SIGTERM_CHILD, *_argv(tiny, run, "--workers", "1")],
                          capture_output=True, text=True, timeout=300, env=ENV, start_new_session=True)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("dgmr: stopped: SIGTERM after step 3 of 6") and "--resume" in err, proc.stderr
    assert load_checkpoint(run)["step"] == 3  # --save-every 100: this checkpoint exists only because of the signal
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2, 3]
    assert not (run / "dgmr.json").exists() and not list(run.glob(".*"))
    assert main(["distill", "--out", str(run), "--resume", "--no-progress"]) == 0
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("loss") for r in _metrics(run)][1:] == pytest.approx([r.get("loss") for r in _metrics(ref)][1:],
                                                                        rel=1e-6)


def test_sigusr1_in_the_python_api(tiny, tmp_path):
    """SIGUSR1 (SLURM's --signal) during the API call: Preempted after a checkpoint; the
    previous handler is back afterwards."""
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)

    def on_step(info):
        if info["step"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted, match="SIGUSR1 after step 2 of 6"):
        distill(str(tiny["teacher"]), str(tiny["student"]), str(tiny["images"]), run, steps=6, batch_size=4,
                log_every=4, eval_every=6, save_every=100, workers=0, progress=False, on_step=on_step, device="cpu")
    assert signal.getsignal(signal.SIGUSR1) is before
    assert load_checkpoint(run)["step"] == 2
    assert [r["step"] for r in _metrics(run)] == [0, 2]  # log_every 4, but the checkpoint's step is logged
    r = distill(None, None, None, run, resume=True, progress=False)
    assert r["steps"] == 6 and r["final_loss"] is not None


PRUNE_CHILD = textwrap.dedent("""
    import os, signal, sys
    import dgmr.models.artifact as artifact
    from dgmr.cli import main

    save_model = artifact.save_model
    def slow_save(model, path, **kw):  # the signal with the weights half written
        save_model(model, path, **kw)
        os.kill(os.getpid(), getattr(signal, os.environ.get("DGMR_TEST_SIGNAL", "SIGTERM")))
    artifact.save_model = slow_save
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig, code", [("SIGTERM", EXIT_TERMINATED), ("SIGUSR1", 128 + 10)])
def test_prune_sigterm_removes_its_temporary_output(tmp_path, sig, code):
    out = tmp_path / "pruned"
    proc = subprocess.run([sys.executable, "-c", PRUNE_CHILD, "prune", *TINY_VIT_ARGV, "--mlp-ratio", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**ENV, "DGMR_TEST_SIGNAL": sig})
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"dgmr: terminated by {sig}; temporary output removed"
    assert list(tmp_path.iterdir()) == []  # no .pruned.tmp-*, no lock file, no output


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_processes_removed_on_resume_and_write(tiny, tmp_path):
    run = tmp_path / "run"
    assert main(_argv(tiny, run, "--workers", "0", "--steps", "2")) == 0
    dead, alive = _dead_pid(), os.getppid()
    leftovers = [run / f".checkpoint.pt.tmp-{dead}", run / f".export-{dead}", run / f".metrics.jsonl.tmp-{dead}"]
    leftovers[0].write_bytes(b"partial")
    (leftovers[1]).mkdir()
    (leftovers[1] / "model.safetensors").write_bytes(b"partial")
    leftovers[2].write_text("{}")
    live = run / f".checkpoint.pt.tmp-{alive}"  # a process that still runs: never touched
    live.write_bytes(b"x")
    assert main(["distill", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert not any(p.exists() for p in leftovers) and live.exists()
    # prune's hidden temporary directory, next to the output
    out = tmp_path / "pruned"
    stale = tmp_path / f".pruned.tmp-{dead}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert main(["prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", str(out)]) == 0
    assert not stale.exists() and (out / "dgmr.json").is_file()
    other = tmp_path / f".other.tmp-{dead}-0123abcd"  # another output's: left to its own writer
    other.mkdir()
    assert remove_stale_temps(tmp_path, "pruned") == [] and other.exists()


def test_open_clip_config_registration_leaves_no_temp_dir(tmp_path, monkeypatch):
    import tempfile

    import open_clip

    from dgmr.models.sources import register_open_clip_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TemporaryDirectory/mkdtemp write
    cfg = dict(open_clip.get_model_config("ViT-B-32"))
    register_open_clip_config("dgmr-test-leak-a", cfg)
    register_open_clip_config("dgmr-test-leak-b", cfg)  # a second registration rescans the known paths
    assert list(tmp_path.iterdir()) == []  # each call used to leave a dgmr-open_clip-* directory
    assert open_clip.get_model_config("dgmr-test-leak-a") == cfg == open_clip.get_model_config("dgmr-test-leak-b")


EXPORT_SIGTERM_CHILD = textwrap.dedent("""
    import os, signal, sys
    import dgmr.models.artifact as artifact
    from dgmr.cli import main

    save_model = artifact.save_model
    def signalled(model, path, **kw):  # SIGTERM with the export's weights written, its config not yet
        save_model(model, path, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
    artifact.save_model = signalled
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_the_export_cleans_it_and_resume_exports(tiny, tmp_path):
    """After the training loop, SIGTERM is the command-wide handler's: the half export goes,
    the final checkpoint stays, exit 143; --resume only exports."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", EXPORT_SIGTERM_CHILD, *_argv(tiny, run, "--workers", "0",
                                                                             "--steps", "2")],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == EXIT_TERMINATED, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "run_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file either
    assert main(["distill", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert (run / "dgmr.json").is_file() and not list(run.glob(".*"))
