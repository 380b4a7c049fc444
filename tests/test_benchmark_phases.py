"""benchmarks/calibration.py --phases times the calibrated prune's phases by wrapping dgmr's
own functions: they must all exist and run in a sweep, add up to the prune's time, and be
put back afterwards (docs/calibration.md, "Measured", reads its figures)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"
    spec = importlib.util.spec_from_file_location("calibration_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_phase_of_the_sweep_is_timed_and_the_functions_come_back(bench):
    cpu = torch.device("cpu")
    phases = bench.phase_targets()
    originals = {key: getattr(owner, attr) for key, (owner, attr) in phases.items()}
    model, images = bench.speed_model("vit-s12", True, cpu, 8)  # depth 2 at 56 px
    spent: dict[str, float] = {}
    with bench.timed_phases(cpu, spent):
        _, (wall, _), _ = bench.timed_prune(model, images, cpu)
    assert set(spent) == set(phases)
    assert all(s > 0 for s in spent.values())
    assert {key: getattr(owner, attr) for key, (owner, attr) in phases.items()} == originals
    row = bench.phase_row(spent, wall, wall)  # in units of the prune's own time
    assert set(row) == set(phases) | {"rest"}
    assert sum(row.values()) == pytest.approx(1.0, abs=0.01)
    assert row["block_passes"] > 0 and row["rest"] > -0.01  # nested phases are not counted twice
