"""How close calibrated pruning starts to the original, per MLP and in total, side by side.

For each model (the `dgmr demo` teacher trained on sklearn digits, and a random-init timm
ViT-B/16) and mlp ratio r in {1, 0.5}, this prunes with
- `plain`: diversity, weights only (the paper),
- `comp`: diversity + least-squares compensation,
- `act`: diversity-act (activation-aware selection) + compensation,
- `global`: diversity + compensation + global width allocation,
and measures on HELD-OUT images (not the calibration ones) every MLP's relative output error
||mlp_pruned(x) - mlp_original(x)||^2 / ||mlp_original(x)||^2, where x is the input the pruned
model feeds that MLP (errors of earlier layers included), plus the whole tower's relative
output error and the seconds calibration took. The demo teacher also gets kNN / head top-1
before distillation.

    python benchmarks/calibration.py [--models demo,vit-b] [--quick] [--json out.json]

`--speed` measures what a calibrated prune costs instead (docs/calibration.md, "Cost"): for
random-init timm models (ViT-S at depths 12 and 24, ViT-B, ViT-L; EVA02-L and EVA02-E for a
GPU) and 64 smooth random images at 224 px, it times one forward pass of those images and,
at `mlp_ratio=1`, the calibrated prune (diversity + compensation) that walks the blocks one
by one (`sweep`), the same with full forward passes up to every MLP (`full`:
`calibration_sweep=False`, the fallback and the cost model before the sweep) and the
weights-only prune (`plain`: the selection and the cut, which a calibrated prune does too),
all in the same process. It reports each in forward-pass equivalents (wall-clock, and this
process's CPU seconds), the largest weight difference between sweep and full passes,
with `--phases` where the sweep's time goes (the first pass, the block passes, the moments
gathered inside them, the selection, the advance, the refit, in forward passes too; on a
GPU from an extra sweep, so that the synchronisations it needs do not slow the timed one), and
on a GPU the peak memory (the benchmark's model and the prune's copy included: `model_gib`
is one of them). `--baseline-src DIR` also times the dgmr source tree DIR (an older
checkout) in a subprocess, the same way. `--tiny` shrinks every model (depth 2, 56 px) to
try the script on a CPU.

    python benchmarks/calibration.py --speed --models vit-s12,vit-s24,vit-b,vit-l [--baseline-src DIR]
    python benchmarks/calibration.py --speed --models eva02-l,eva02-e --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import time
import warnings
from typing import Any

import torch
from torch import nn

import dgmr
from dgmr.models.families import family_of

METHODS = {
    "plain": dict(criterion="diversity"),
    "comp": dict(criterion="diversity", calibrate=dict(compensation=True)),
    "act": dict(criterion="diversity-act", calibrate=dict(compensation=True)),
    "global": dict(criterion="diversity", calibrate=dict(compensation=True, allocate="global")),
}


def mlp_errors(original: nn.Module, pruned: nn.Module, x: torch.Tensor, batch: int = 64) -> tuple[list[float], float]:
    """Per-MLP relative output error (on the pruned model's own inputs) and the tower's."""
    fam = family_of(pruned)
    sites_p, sites_o = fam.mlps(pruned), fam.mlps(original)
    num = [0.0] * len(sites_p)
    den = [0.0] * len(sites_p)
    hooks = []
    for j, (sp, so) in enumerate(zip(sites_p, sites_o)):
        def hook(_m, args, out, j=j, so=so):
            ref = so.module(*args)
            num[j] += float(((out - ref) ** 2).sum())
            den[j] += float((ref ** 2).sum())
        hooks.append(sp.module.register_forward_hook(hook))
    tower_num = tower_den = 0.0
    with torch.no_grad():
        for xb in x.split(batch):
            yp = fam.image_forward(pruned, xb)
            yo = fam.image_forward(original, xb)
            tower_num += float(((yp - yo) ** 2).sum())
            tower_den += float((yo ** 2).sum())
    for h in hooks:
        h.remove()
    return [n / d for n, d in zip(num, den)], tower_num / tower_den


def demo_model(quick: bool) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor, dict]:
    from dgmr.demo import DemoSettings, _normalizer, cached_teacher, digits_split

    s = DemoSettings.make("runs/demo", 0, quick)
    data = digits_split(0)
    teacher, src, _ = cached_teacher(data, s, progress=False)
    norm = _normalizer(teacher)
    return teacher, src, norm(data["x_train"][:256]), norm(data["x_test"]), data


def vit_b(quick: bool) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor, None]:
    import timm

    torch.manual_seed(0)
    size = 64 if quick else 112
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, num_classes=0).eval()
    g = torch.Generator().manual_seed(0)
    # smooth random images (low-frequency noise upsampled) rather than white noise
    cal = nn.functional.interpolate(torch.randn(64, 3, 8, 8, generator=g), size=size, mode="bilinear")
    held = nn.functional.interpolate(torch.randn(32, 3, 8, 8, generator=g), size=size, mode="bilinear")
    return model, None, cal, held, None


def run(name: str, loader, ratios: list[float], quick: bool) -> list[dict[str, Any]]:
    model, src, cal, held, data = loader(quick)
    rows = []
    for r in ratios:
        for method, spec in METHODS.items():
            student = copy.deepcopy(model)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = dict(calibration=cal, calibration_images=len(cal), **spec["calibrate"]) if "calibrate" in spec else {}
                student, rec = dgmr.prune(student, mlp_ratio=r, criterion=spec["criterion"], progress=False,
                                          source=src, **kwargs)
            seconds = time.perf_counter() - t
            per_layer, tower = mlp_errors(model, student, held)
            row = {"model": name, "mlp_ratio": r, "method": method, "seconds": round(seconds, 2),
                   "mlp_rel_err_mean": sum(per_layer) / len(per_layer), "mlp_rel_err": per_layer,
                   "tower_rel_err": tower, "widths": sorted(set(rec.widths.values()))}
            if data is not None:
                from dgmr.demo import score

                row.update(score(student, data))
            rows.append(row)
            extra = f"  kNN {100 * row['knn_top1']:.1f}  head {100 * row['head_top1']:.1f}" if data else ""
            print(f"{name:7s} r={r:<4g} {method:7s} MLP err mean {row['mlp_rel_err_mean']:.4f}  "
                  f"tower err {tower:.4f}  {seconds:6.2f} s{extra}", flush=True)
        if data is not None and r == ratios[0]:
            from dgmr.demo import score

            t = score(model, data)
            print(f"{name:7s} teacher kNN {100 * t['knn_top1']:.1f}  head {100 * t['head_top1']:.1f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# --speed: the calibrated prune's cost in forward passes
SPEED_MODELS = {
    "vit-s12": ("vit_small_patch16_224", {}),
    "vit-s24": ("vit_small_patch16_224", {"depth": 24}),
    "vit-b": ("vit_base_patch16_224", {}),
    "vit-l": ("vit_large_patch16_224", {}),
    "eva02-l": ("eva02_large_patch14_224", {}),
    "eva02-e": ("eva02_enormous_patch14_clip_224", {}),
}


class Clock:
    """Wall-clock seconds and this process's CPU seconds (all its threads) since it started:
    on a shared machine, the CPU seconds of a one-thread run move less with the load."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _sync(device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        _sync(self.device)
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_model(name: str, tiny: bool, device: torch.device, images: int) -> tuple[nn.Module, torch.Tensor]:
    """A random-init timm model (``tiny``: depth 2 at 56 px) and smooth random images at its size."""
    import timm

    arch, kwargs = SPEED_MODELS[name]
    kwargs = {**kwargs, **({"depth": 2, "img_size": 56} if tiny else {})}
    torch.manual_seed(0)
    with torch.device(device):  # random weights drawn where they live (EVA02-E's 4.4B on the host would take minutes)
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    size = model.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(0)
    return model, nn.functional.interpolate(torch.randn(images, 3, 8, 8, generator=g), size=size, mode="bilinear")


def forward_seconds(model: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 32) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward pass of ``images`` in calibration's batches and
    precision (bf16 autocast on a GPU)."""
    fam = family_of(model)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        clock = Clock(device)
        for xb in images.split(batch):
            fam.image_forward(model, xb.to(device))
        return clock.read()


def phase_targets() -> dict[str, tuple[Any, str]]:
    """Where the sweep's time goes (docs/calibration.md, "Cost"): phase -> (owner, attribute)
    timed around every call; the moments are gathered by hooks inside the block passes.
    (Imported here: an older source tree timed with --baseline-src has no sweep.)"""
    from dgmr.prune.calibration import cut, moments, refit, runner, sweep

    return {"first_pass": (runner.Runner, "forward_order"), "block_passes": (sweep.Walker, "run"),
            "moments": (moments.Moments, "add"), "advance": (sweep.Walker, "advance"),
            "selection": (cut, "select_neurons"), "refit": (refit, "refit_down")}


@contextlib.contextmanager
def timed_phases(device: torch.device, spent: dict[str, float]):
    """Adds into ``spent`` the wall-clock seconds of each of :func:`phase_targets` while inside
    (the CUDA stream synchronised around every call, so that a phase is charged its own work)."""
    saved = []
    for key, (owner, attr) in phase_targets().items():
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def timed(*args: Any, fn=fn, key=key, **kwargs: Any) -> Any:
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, attr, functools.wraps(fn)(timed))
    try:
        yield spent
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def phase_row(spent: dict[str, float], total: float, forward: float) -> dict[str, float]:
    """The phases in forward passes: the block passes without the moments gathered inside
    them, and ``rest`` for what no phase covers. (Every moment is gathered inside a block pass
    for the benchmark's prune, diversity + compensation at uniform widths; global allocation
    or full passes gather some elsewhere, and the subtraction would not hold.)"""
    out = {k: spent.get(k, 0.0) for k in phase_targets()}
    out["block_passes"] -= out["moments"]
    out["rest"] = total - sum(out.values())
    return {k: round(v / forward, 3) for k, v in out.items()}


def timed_prune(model: nn.Module, images: torch.Tensor, device: torch.device,
                **kw: Any) -> tuple[nn.Module, tuple[float, float], int]:
    """(pruned copy, (wall, CPU) seconds, peak GPU bytes or 0) of a calibrated prune at mlp_ratio=1
    (diversity + compensation, every image calibrating)."""
    student = copy.deepcopy(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if kw.pop("plain", False):  # weights only: the selection and the cut, which a calibrated prune does too
        clock = Clock(device)
        student, _ = dgmr.prune(student, mlp_ratio=1.0, progress=False)
        return student, clock.read(), 0
    clock = Clock(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, _ = dgmr.prune(student, mlp_ratio=1.0, calibration=images, calibration_images=len(images),
                                progress=False, calibration_device=device.type, **kw)
    seconds = clock.read()
    return student, seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def measure(model: nn.Module, images: torch.Tensor, device: torch.device,
            prunes: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """The forward pass (before and after the prunes, averaged) and each prune of ``prunes``
    (name -> prune keywords), in seconds and forward passes (wall and CPU)."""
    forward_seconds(model, images[:2], device)  # warm-up
    fwd = [forward_seconds(model, images, device)]
    spent, pruned, row, phases = {}, {}, {}, {}
    for v, kw in prunes.items():
        with timed_phases(device, phases.setdefault(v, {})) if kw.pop("phases", False) else contextlib.nullcontext():
            pruned[v], spent[v], peak = timed_prune(model, images, device, **kw)
        if peak:
            row[f"{v}_peak_gib"] = round(peak / 2**30, 2)
    fwd.append(forward_seconds(model, images, device))
    wall, cpu = (sum(f[i] for f in fwd) / len(fwd) for i in (0, 1))
    row.update(forward_s=round(wall, 3), forward_cpu_s=round(cpu, 3), forward_runs_s=[round(f[0], 3) for f in fwd])
    for v in prunes:
        row[f"{v}_s"], row[f"{v}_cpu_s"] = round(spent[v][0], 2), round(spent[v][1], 2)
        row[f"{v}_passes"], row[f"{v}_cpu_passes"] = round(spent[v][0] / wall, 2), round(spent[v][1] / cpu, 2)
        if phases.get(v):  # one prune is timed by phase: the sweep, or on a GPU a sweep of its own
            row["sweep_phases"] = phase_row(phases[v], spent[v][0], wall)
    return row, pruned


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    sb = b.state_dict()
    return max(float((t.double() - sb[k].double()).norm() / (sb[k].double().norm() + 1e-30))
               for k, t in a.state_dict().items() if t.is_floating_point())


def baseline(src: str, a: argparse.Namespace, name: str) -> dict[str, Any]:
    """The same measurement of the dgmr source tree ``src`` (an older checkout: full passes,
    it has no sweep), in a subprocess with the same threads."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--speed-worker", name, "--device", a.device, "--images", str(a.images),
           "--threads", str(torch.get_num_threads())] + (["--tiny"] if a.tiny else [])
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_speed(a: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(a.device)
    variants = a.variants.split(",")
    rows = []
    for name in a.models.split(","):
        model, images = speed_model(name, a.tiny, device, a.images)
        row: dict[str, Any] = {"model": name, "depth": len(model.blocks), "images": len(images),
                               "size": images.shape[-1], "device": device.type, "threads": torch.get_num_threads(),
                               "model_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)}
        if device.type == "cuda":
            row["gpu"] = torch.cuda.get_device_name()
        kinds = {"sweep": dict(calibration_sweep=True), "full": dict(calibration_sweep=False), "plain": dict(plain=True)}
        timed = list(variants)
        if a.phases and device.type == "cuda":  # the phases' syncs would slow the sweep timed above: a prune of their own
            kinds["phased"] = dict(calibration_sweep=True, phases=True)
            timed.append("phased")
        elif a.phases:  # on a CPU they cost nothing: the sweep itself
            kinds["sweep"]["phases"] = True
        found, pruned = measure(model, images, device, {v: dict(kinds[v]) for v in timed})
        row.update(found)
        if "sweep" in pruned and "full" in pruned:
            row["max_rel_weight_diff"] = _max_rel_diff(pruned["sweep"], pruned["full"])
        del model, pruned
        if a.baseline_src:
            row.update({f"baseline_{k}": v for k, v in baseline(a.baseline_src, a, name).items()})
        rows.append(row)
        cols = [f"{v} {row[f'{v}_s']:.2f} s = {row[f'{v}_passes']:.2f} passes (CPU {row[f'{v}_cpu_passes']:.2f})"
                + (f", peak {row[f'{v}_peak_gib']} GiB" if f"{v}_peak_gib" in row else "") for v in variants]
        if a.baseline_src:
            cols.append(f"baseline {row['baseline_prune_s']:.2f} s = {row['baseline_prune_passes']:.2f} passes "
                        f"(CPU {row['baseline_prune_cpu_passes']:.2f})")
        if "max_rel_weight_diff" in row:
            cols.append(f"max weight diff {row['max_rel_weight_diff']:.1e}")
        print(f"{name:8s} depth {row['depth']:2d}  forward {row['forward_s']:.3f} s  " + "  ".join(cols), flush=True)
        if "sweep_phases" in row:
            print(f"{'':8s} sweep phases in passes: "
                  + "  ".join(f"{k} {v:.3f}" for k, v in row["sweep_phases"].items()), flush=True)
    return rows


def speed_worker(a: argparse.Namespace) -> None:
    """--speed-worker: forward + calibrated prune with whatever dgmr is importable (no sweep flag)."""
    device = torch.device(a.device)
    model, images = speed_model(a.speed_worker, a.tiny, device, a.images)
    row, _ = measure(model, images, device, {"prune": {}})
    print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated: demo, vit-b (quality); with --speed: "
                   + ", ".join(SPEED_MODELS) + " (default vit-s12,vit-s24,vit-b,vit-l)")
    p.add_argument("--ratios", default="1,0.5")
    p.add_argument("--quick", action="store_true", help="smaller ViT-B input (64 px) for a fast check")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--speed", action="store_true", help="time the calibrated prune in forward passes instead")
    p.add_argument("--variants", default="sweep,full,plain",
                   help="with --speed: sweep (blocks one by one), full (full passes), plain (no calibration)")
    p.add_argument("--device", default="cpu", help="with --speed: cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="with --speed: depth 2, 56 px (to try the script on a CPU)")
    p.add_argument("--images", type=int, default=64, help="with --speed: calibration images (and the forward's)")
    p.add_argument("--threads", type=int, help="with --speed: CPU threads of torch and of scipy's BLAS (default: theirs)")
    p.add_argument("--baseline-src", help="with --speed: also time the dgmr source tree at this path (its src/)")
    p.add_argument("--phases", action="store_true",
                   help="with --speed: break the sweep's time into its phases (first pass, block passes, moments, ...)")
    p.add_argument("--speed-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:  # torch's and the BLAS's under scipy (geqp3 selects there): idle BLAS threads spin on a busy machine
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(a.threads)
        threadpool_limits(a.threads)
    if a.speed_worker:
        return speed_worker(a)
    if a.speed:
        a.models = a.models or "vit-s12,vit-s24,vit-b,vit-l"
        rows = run_speed(a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return None
    a.models = a.models or "demo,vit-b"
    loaders = {"demo": demo_model, "vit-b": vit_b}
    ratios = [float(v) for v in a.ratios.split(",")]
    rows = [row for m in a.models.split(",") for row in run(m, loaders[m], ratios, a.quick)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
