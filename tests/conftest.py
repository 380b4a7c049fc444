"""Fixtures every test module may use; the plain helpers live in ``helpers.py``."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dgmr import ATTENTION_KINDS, CRITERIA, FAMILIES, HEAD_CRITERIA, MLP_KINDS

from helpers import run_cli


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to CPU oversubscription
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """``cli("prune", ...)`` runs ``dgmr prune ...`` in-process: (exit code, stdout, stderr)."""
    return lambda *argv: run_cli(capsys, *argv)


@pytest.fixture(autouse=True)
def registries_left_as_found():
    """The extension registries are process-global: a test that registers a criterion, MLP
    kind or family must take it out again (or the next test runs with it). Fails the test
    that leaks one, and puts the registries back so that the others still run clean."""
    regs = {"criterion": CRITERIA, "MLP kind": MLP_KINDS, "family": FAMILIES, "attention kind": ATTENTION_KINDS,
            "head criterion": HEAD_CRITERIA}
    before = {what: (dict(r._user), dict(r._builtin)) for what, r in regs.items()}
    yield
    leaks = []
    for what, r in regs.items():
        user, builtin = before[what]
        # built-ins a module registers on first import are fine; changed or removed ones are not
        changed = (r._user != user or any(r._builtin.get(k) is not v for k, v in builtin.items())
                   or [k for k in r._builtin if k in builtin] != list(builtin))
        if changed:
            leaks.append(f"{what}: {list(r)} (was {[*reversed(list(user)), *builtin]})")
            r._user.clear()
            r._user.update(user)
            extra = {k: v for k, v in r._builtin.items() if k not in builtin}
            r._builtin.clear()
            r._builtin.update(builtin)
            r._builtin.update(extra)
    assert not leaks, "the test left the registries changed: " + "; ".join(leaks)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where torch sees a GPU (the lent GPU machine); CI skips them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mounted(tmp_path):
    """``mounted(dir, size)`` mounts a tmpfs of ``size`` at ``dir`` (root only; skipped where mount is not permitted)."""
    points = []

    def mount(d: Path, size: str = "1m") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        d.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mount not permitted here: {r.stderr.decode().strip()}")
        points.append(d)
        return d

    yield mount
    for d in reversed(points):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
