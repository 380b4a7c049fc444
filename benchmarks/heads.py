"""Accuracy and feature error against parameters: MLP-only, heads-only and MLP+heads cuts,
plain and calibrated, side by side (docs/heads.md, "Measured").

For the `dgmr demo` teacher (a digits ViT, width 96, depth 6, 3 heads of 32; trained and
cached under runs/demo/teacher like the demo does) and a random-init timm ViT-B/16 (112 px,
smooth random images), each cut is pruned twice:
- `plain`: diversity on the weights (the paper's MLP cut, the block greedy for heads);
- `cal`: diversity + least-squares refit of every cut projection on 256 (demo) / 64 (ViT-B)
  calibration images; `params_fraction` cuts spend one budget across MLP neurons and heads
  (`--allocate global`), which only calibration can measure, so they have no `plain` row.

It reports the vision tower's parameters (fraction of the original), the tower's relative
output error on held-out images (not the calibration ones) and, for the demo teacher, kNN
(k=20) and classifier-head top-1 on the digits test split before any distillation.

`--eva` counts EVA02-E/14 (EVA-CLIP-E's tower, `eva02_enormous_patch14_clip_224`) on the
meta device with `dgmr stats`: params and FLOPs at MLP r=1, with and without half the heads
(8 of 16). `--throughput` (on a GPU) also times bf16 batch-64 forwards of those towers.

    python benchmarks/heads.py [--models demo,vit-b] [--eva] [--throughput] [--json out.json]
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

# (label, kind, prune keywords); kind: mlp (MLP-only), heads (heads only), both (MLP + heads)
CUTS = [
    ("MLP r=1", "mlp", dict(mlp_ratio=1.0)),
    ("MLP r=0.5", "mlp", dict(mlp_ratio=0.5)),
    ("MLP r=0.25", "mlp", dict(mlp_ratio=0.25)),
    ("MLP r=0.125", "mlp", dict(mlp_ratio=0.125)),
    ("heads 2/3", "heads", dict(head_fraction=2 / 3)),
    ("heads 1/3", "heads", dict(head_fraction=1 / 3)),
    ("r=1 + heads 2/3", "both", dict(mlp_ratio=1.0, head_fraction=2 / 3)),
    ("r=0.5 + heads 2/3", "both", dict(mlp_ratio=0.5, head_fraction=2 / 3)),
    ("params 0.40", "budget", dict(params_fraction=0.40)),
    ("params 0.35", "budget", dict(params_fraction=0.35)),
    ("params 0.32", "budget", dict(params_fraction=0.32)),
    ("params 0.28", "budget", dict(params_fraction=0.28)),
]


def demo_model() -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor, dict]:
    from dgmr.demo import DemoSettings, _normalizer, cached_teacher, digits_split

    s = DemoSettings.make("runs/demo", 0, False)
    data = digits_split(0)
    teacher, src, _ = cached_teacher(data, s, progress=False)
    norm = _normalizer(teacher)
    return teacher, src, norm(data["x_train"][:256]), norm(data["x_test"]), data


def vit_b() -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor, None]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=112, num_classes=0).eval()
    g = torch.Generator().manual_seed(0)
    smooth = lambda n: nn.functional.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=112,  # noqa: E731
                                                 mode="bilinear")
    return model, None, smooth(64), smooth(32), None


def tower_error(original: nn.Module, pruned: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    fam = family_of(pruned)
    num = den = 0.0
    with torch.no_grad():
        for xb in x.split(batch):
            yp, yo = fam.image_forward(pruned, xb), fam.image_forward(original, xb)
            num += float(((yp - yo) ** 2).sum())
            den += float((yo ** 2).sum())
    return num / den


def _one(model: nn.Module, src: Any, cal: torch.Tensor | None, kw: dict[str, Any]) -> tuple[nn.Module, float]:
    student = copy.deepcopy(model)
    extra: dict[str, Any] = {}
    if cal is not None:
        extra = dict(calibration=cal, calibration_images=len(cal))
        if "params_fraction" in kw:
            extra["allocate"] = "global"
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student, _ = dgmr.prune(student, progress=False, source=src, **kw, **extra)
    return student, time.perf_counter() - t


def run(name: str, loader, kinds: set[str], cuts: set[str] | None) -> list[dict[str, Any]]:
    model, src, cal, held, data = loader()
    fam = family_of(model)
    total = fam.vision_params(model)
    rows: list[dict[str, Any]] = []
    if data is not None:
        from dgmr.demo import score

        t = score(model, data)
        rows.append({"model": name, "cut": "teacher", "kind": "teacher", "method": "-", "params": total,
                     "params_fraction": 1.0, "tower_rel_err": 0.0, **t})
        print(f"{name:6s} teacher  kNN {100 * t['knn_top1']:.1f}  head {100 * t['head_top1']:.1f}", flush=True)
    for label, kind, kw in [c for c in CUTS if c[1] in kinds and (cuts is None or c[0] in cuts)]:
        for method in (("cal",) if kind == "budget" else ("plain", "cal")):
            student, seconds = _one(model, src, cal if method == "cal" else None, kw)
            params = fam.vision_params(student)
            row = {"model": name, "cut": label, "kind": kind, "method": method, "params": params,
                   "params_fraction": params / total, "seconds": round(seconds, 2),
                   "heads_kept_fraction": sum(s.heads for s in fam.attention(student)) /
                   sum(s.heads for s in fam.attention(model)),
                   "tower_rel_err": tower_error(model, student, held)}
            if data is not None:
                from dgmr.demo import score

                row.update(score(student, data))
            rows.append(row)
            acc = f"  kNN {100 * row['knn_top1']:.1f}  head {100 * row['head_top1']:.1f}" if data is not None else ""
            print(f"{name:6s} {label:18s} {method:5s} params {100 * row['params_fraction']:5.1f}%  heads "
                  f"{100 * row['heads_kept_fraction']:5.1f}%  tower err {row['tower_rel_err']:.4f}{acc}  "
                  f"{seconds:.1f} s", flush=True)
    return rows


def eva_counts(throughput: bool) -> list[dict[str, Any]]:
    """EVA02-E/14 at MLP r=1, all heads and half of them: params and FLOPs on the meta device."""
    from dgmr.prune.stats import stats

    spec = "timm:eva02_enormous_patch14_clip_224"
    rows = []
    for label, kw in (("r=1", {}), ("r=1 + half the heads", {"head_fraction": 0.5})):
        st = stats(spec, mlp_ratio=1.0, **kw)
        row = {"model": "eva02-e", "cut": label, **{k: st[k] for k in ("params_before", "params_after",
                                                                        "flops_before", "flops_after")}}
        if throughput:
            row.update(gpu_throughput(spec, kw))
        rows.append(row)
        print(f"EVA02-E {label:22s} params {st['params_before'] / 1e6:7.1f} M -> {st['params_after'] / 1e6:7.1f} M  "
              f"GFLOPs {st['flops_before'] / 1e9:7.1f} -> {st['flops_after'] / 1e9:7.1f}", flush=True)
    return rows


def gpu_throughput(spec: str, kw: dict[str, Any], batch: int = 64, steps: int = 10) -> dict[str, float]:
    """Images/s of the random-init tower before and after the cut (bf16 autocast, batch 64),
    built, pruned and timed on CUDA."""
    from dgmr.models.sources import build_model, parse_spec

    with torch.device("cuda"):
        net = build_model(parse_spec(spec, {}), pretrained=False).eval()
    fam = family_of(net)
    out = {}
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    for key in ("before", "after"):
        if key == "after":
            net, _ = dgmr.prune(net, mlp_ratio=1.0, progress=False, **kw)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                fam.image_forward(net, x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                fam.image_forward(net, x)
            torch.cuda.synchronize()
        out[f"images_per_s_{key}"] = batch * steps / (time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,vit-b", help="comma-separated: demo, vit-b (or none)")
    p.add_argument("--kinds", default="mlp,heads,both,budget", help="which cuts: mlp (MLP-only), heads (heads "
                   "only), both (MLP + heads, uniform), budget (params_fraction, global)")
    p.add_argument("--cuts", default=None, help="only these cuts, by label, comma-separated (e.g. 'MLP r=1,params 0.32')")
    p.add_argument("--eva", action="store_true", help="EVA02-E params and FLOPs (meta device)")
    p.add_argument("--throughput", action="store_true", help="with --eva: bf16 batch-64 images/s on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="write every row here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    loaders = {"demo": demo_model, "vit-b": vit_b}
    rows = [r for name in a.models.split(",") if name in loaders for r in run(name, loaders[name], set(a.kinds.split(",")),
                                                                   set(a.cuts.split(",")) if a.cuts else None)]
    if a.eva:
        rows += eva_counts(a.throughput)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
