"""Params, FLOPs, measured throughput and peak memory of vision towers.

Throughput is images/s of the vision tower's forward on a fixed batch, after warm-up,
as the median over repeats. With several models, rounds alternate between them (A, B, A,
B, ...) so drift in clock speed or load hits all of them alike; ``speedup`` is the
measured throughput ratio last/first model next to ``flops_ratio`` = FLOPs first/last.
Peak memory is exact on CUDA (``max_memory_allocated`` during the timed forwards); on CPU
it is the process's resident set size sampled every 2 ms while the model runs.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Mapping

import torch
from torch import nn

from ..core.errors import DgmrError, first_line
from ..core.memory import PeakRss
from ..models.cost import count_flops
from ..models.families import Family, family_of


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_image_size(model: nn.Module, family: Family, image_size: int, label: str = "the model") -> None:
    """One forward on a zero image (on the model's device and dtype); a model that cannot
    take ``image_size`` gives one clear error."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            family.image_forward(model, x)
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        native = family.data_config(model)["image_size"]
        first = first_line(e)
        raise DgmrError(f"{label} cannot take {image_size} px images (it was built for {native} px): {first}") from e


@torch.no_grad()
def measure_speed(
    models: Mapping[str, nn.Module] | list[nn.Module],
    *,
    batch_size: int = 32,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """Measure each model's vision tower; returns ``{"models": {name: {params, flops,
    throughput, latency_ms, peak_memory_bytes, ...}}, "speedup", "flops_ratio", ...}``
    (``speedup``/``flops_ratio`` compare the last model with the first)."""
    if not isinstance(models, Mapping):
        models = {f"model{i}": m for i, m in enumerate(models)}
    if not models:
        raise DgmrError("no model to measure")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise DgmrError("batch size and repeats must be >= 1, warm-up >= 0")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fams = {name: family_of(m) for name, m in models.items()}
    sizes = {name: fams[name].data_config(m)["image_size"] for name, m in models.items()}
    size = int(image_size or next(iter(sizes.values())))
    rows: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        m.to(device=device, dtype=dtype).eval()
        check_image_size(m, fams[name], size, label=name)
        rows[name] = {"params": fams[name].vision_params(m), "flops": count_flops(m, fams[name], size),
                      "native_image_size": sizes[name]}
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, int] = {}
    for name, m in models.items():  # warm-up + peak memory, one model at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for _ in range(max(1, warmup)):
                fams[name].image_forward(m, x)
            _sync(device)
            peaks[name] = torch.cuda.max_memory_allocated(device)
            rows[name]["activation_memory_bytes"] = peaks[name] - base
        else:
            with PeakRss(every=0.002) as s:
                for _ in range(max(1, warmup)):
                    fams[name].image_forward(m, x)
            peaks[name] = s.peak
    for _ in range(repeats):  # alternate models round by round
        for name, m in models.items():
            _sync(device)
            t0 = time.perf_counter()
            fams[name].image_forward(m, x)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    for name in models:
        med = statistics.median(times[name])
        rows[name].update({
            "throughput": batch_size / med,
            "latency_ms": 1000 * med,
            "latency_ms_min": 1000 * min(times[name]),
            "latency_ms_max": 1000 * max(times[name]),
            "peak_memory_bytes": peaks[name],
        })
    names = list(models)
    first, last = rows[names[0]], rows[names[-1]]
    result: dict[str, Any] = {
        "metric": "speed", "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size, "image_size": size,
        "warmup": warmup, "repeats": repeats,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS (sampled)",
        "models": rows,
    }
    if len(names) > 1:
        result["speedup"] = last["throughput"] / first["throughput"]
        result["flops_ratio"] = first["flops"] / last["flops"]
        result["params_ratio"] = first["params"] / last["params"]
    return result
