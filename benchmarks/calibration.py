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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,vit-b", help="comma-separated: demo, vit-b")
    p.add_argument("--ratios", default="1,0.5")
    p.add_argument("--quick", action="store_true", help="smaller ViT-B input (64 px) for a fast check")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    loaders = {"demo": demo_model, "vit-b": vit_b}
    ratios = [float(v) for v in a.ratios.split(",")]
    rows = [row for m in a.models.split(",") for row in run(m, loaders[m], ratios, a.quick)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
