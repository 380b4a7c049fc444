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
GPU), 64 smooth random images at 224 px, `mlp_ratio=1` with calibration (diversity +
compensation), it times one forward pass of those images, the calibrated prune that walks
the blocks one by one (the sweep) and the one with full forward passes up to every MLP
(`calibration_sweep=False`, the fallback: today's cost model), all in the same process, and
reports each in forward-pass equivalents, their largest weight difference, and on a GPU the
peak memory. `--baseline-src DIR` also times the dgmr source tree DIR (an older checkout)
in a subprocess with the same measurement. `--tiny` shrinks every model (depth 2, 56 px) to
try the script on a CPU.

    python benchmarks/calibration.py --speed --models vit-s12,vit-s24,vit-b,vit-l [--baseline-src DIR]
    python benchmarks/calibration.py --speed --models eva02-l,eva02-e --device cuda
"""
from __future__ import annotations

import argparse
import copy
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_model(name: str, tiny: bool, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    import timm

    arch, kwargs = SPEED_MODELS[name]
    size = 56 if tiny else 224
    kwargs = {**kwargs, **({"depth": 2, "img_size": size} if tiny else {})}
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval().to(device)
    size = model.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(0)
    images = nn.functional.interpolate(torch.randn(64, 3, 8, 8, generator=g), size=size, mode="bilinear")
    return model, images


def forward_seconds(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> float:
    """One forward pass of ``images`` in calibration's batches and precision (bf16 autocast on a GPU)."""
    fam = family_of(model)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        _sync(device)
        t = time.perf_counter()
        for xb in images.split(batch):
            fam.image_forward(model, xb.to(device))
        _sync(device)
    return time.perf_counter() - t


def timed_prune(model: nn.Module, images: torch.Tensor, device: torch.device, **kw: Any) -> tuple[nn.Module, float, int]:
    """(pruned copy, seconds, peak GPU bytes or 0) of a calibrated prune at mlp_ratio=1."""
    student = copy.deepcopy(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, _ = dgmr.prune(student, mlp_ratio=1.0, calibration=images, calibration_images=len(images),
                                progress=False, calibration_device=device.type, **kw)
    _sync(device)
    seconds = time.perf_counter() - t
    return student, seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    sb = b.state_dict()
    return max(float((t.double() - sb[k].double()).norm() / (sb[k].double().norm() + 1e-30))
               for k, t in a.state_dict().items() if t.is_floating_point())


def speed(name: str, tiny: bool, device: torch.device, variants: list[str]) -> dict[str, Any]:
    """Forward pass and calibrated prunes of one model, measured side by side."""
    model, images = speed_model(name, tiny, device)
    forward_seconds(model, images[:2], 2, device)  # warm-up
    fwd = [forward_seconds(model, images, 32, device)]
    row: dict[str, Any] = {"model": name, "depth": len(model.blocks), "images": len(images),
                           "size": images.shape[-1], "device": device.type}
    pruned = {}
    for v in variants:
        pruned[v], secs, peak = timed_prune(model, images, device, calibration_sweep=v == "sweep")
        row[f"{v}_s"] = round(secs, 2)
        if peak:
            row[f"{v}_peak_gib"] = round(peak / 2**30, 2)
    fwd.append(forward_seconds(model, images, 32, device))
    row["forward_s"] = round(sum(fwd) / len(fwd), 3)
    row["forward_runs_s"] = [round(f, 3) for f in fwd]
    for v in variants:
        row[f"{v}_passes"] = round(row[f"{v}_s"] / row["forward_s"], 2)
    if len(pruned) == 2:
        row["max_rel_weight_diff"] = _max_rel_diff(pruned["sweep"], pruned["full"])
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name()
    return row


def baseline(src: str, name: str, tiny: bool, device: str) -> dict[str, Any]:
    """The same measurement of the dgmr at ``src`` (its full passes: it has no sweep), in a subprocess."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": src}
    cmd = [sys.executable, __file__, "--speed-worker", name, "--device", device] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def speed_worker(name: str, tiny: bool, device: torch.device) -> None:
    """--speed-worker: forward + calibrated prune with whatever dgmr is importable (no sweep flag)."""
    model, images = speed_model(name, tiny, device)
    forward_seconds(model, images[:2], 2, device)
    fwd = forward_seconds(model, images, 32, device)
    _, secs, peak = timed_prune(model, images, device)
    fwd = (fwd + forward_seconds(model, images, 32, device)) / 2
    print(json.dumps({"forward_s": round(fwd, 3), "prune_s": round(secs, 2), "passes": round(secs / fwd, 2),
                      "peak_gib": round(peak / 2**30, 2)}))


def run_speed(a: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(a.device)
    rows = []
    for name in a.models.split(","):
        row = speed(name, a.tiny, device, a.variants.split(","))
        if a.baseline_src:
            b = baseline(a.baseline_src, name, a.tiny, a.device)
            row.update({"baseline_s": b["prune_s"], "baseline_forward_s": b["forward_s"], "baseline_passes": b["passes"]})
        rows.append(row)
        line = "  ".join(f"{v} {row[f'{v}_s']:7.2f} s = {row[f'{v}_passes']:5.2f} passes"
                         + (f" (peak {row[f'{v}_peak_gib']} GiB)" if f"{v}_peak_gib" in row else "")
                         for v in a.variants.split(","))
        extra = f"  baseline {row['baseline_s']:.2f} s = {row['baseline_passes']:.2f} passes" if a.baseline_src else ""
        diff = f"  max weight diff {row['max_rel_weight_diff']:.1e}" if "max_rel_weight_diff" in row else ""
        print(f"{name:8s} depth {row['depth']:2d}  forward {row['forward_s']:7.3f} s  {line}{extra}{diff}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated: demo, vit-b (quality); with --speed: "
                   + ", ".join(SPEED_MODELS) + " (default vit-s12,vit-s24,vit-b,vit-l)")
    p.add_argument("--ratios", default="1,0.5")
    p.add_argument("--quick", action="store_true", help="smaller ViT-B input (64 px) for a fast check")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--speed", action="store_true", help="time the calibrated prune in forward passes instead")
    p.add_argument("--variants", default="sweep,full", help="with --speed: sweep and/or full")
    p.add_argument("--device", default="cpu", help="with --speed: cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="with --speed: depth 2, 56 px (to try the script on a CPU)")
    p.add_argument("--baseline-src", help="with --speed: also time the dgmr source tree at this path (its src/)")
    p.add_argument("--speed-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.speed_worker:
        return speed_worker(a.speed_worker, a.tiny, torch.device(a.device))
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
