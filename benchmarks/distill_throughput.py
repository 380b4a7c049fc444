"""Distillation images/s next to the hardware's limit, measured side by side in one run.

Teacher: ``--model`` (timm, random weights: the speed does not depend on them); student: its
r=1 DGMR prune. A step is teacher forward (no grad) + student forward + backward + AdamW.

* ``peak``: the device's rate on one large matmul in the compute dtype (8192^3 bf16 on a
  GPU; 2048^3 fp32 on the CPU), measured here;
* ``step``: the bare step on one fixed batch already on the device (dgmr's feature, loss
  and fused-AdamW code, no data loading), eager and with ``torch.compile`` (``--step-variants``:
  compile mode and attention backend, the recipe's ``compile`` and ``attention`` settings);
  ``mfu`` = images/s x (teacher fwd + student fwd+bwd FLOPs per image, from
  ``torch.utils.flop_counter``) / peak;
* ``distill``: the real ``dgmr.distill`` end to end on a folder of JPEGs written here
  (``--images``, decoded and augmented by ``--workers`` DataLoader workers, several epochs, so
  epoch starts are inside the measurement) for each of ``--distill-variants``: images/s over
  all logged steps after the first (and after the first three: compilation, warm-up), the
  slowest logged interval, and the fraction of the same variant's bare-step images/s.

On a CPU everything is fp32 and small (the defaults); on a GPU bf16 autocast:

    python benchmarks/distill_throughput.py                       # CPU, ViT-S/16, batch 16
    python benchmarks/distill_throughput.py --device cuda --model timm:vit_large_patch14_clip_224 \\
        --batch-size 256 --images 2048 --epochs 3 --workers 14 --step-variants eager,on,on:cudnn \\
        --distill-variants eager,on --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import dgmr
from dgmr.distill import distill, feature_loss
from dgmr.distill.parallel import FeatureNet, attention_backend
from dgmr.models.families import family_of
from dgmr.models.sources import build_model, parse_spec

from bench_utils import gemm_rate, sync

WARMUP = 3  # untimed steps first (compilation, autotuning, allocator warm-up)


def models(spec: str, device: torch.device, amp: torch.dtype | None):
    """(teacher, student, family, image size, teacher state): the student is the teacher's r=1 prune."""
    torch.manual_seed(0)
    src = parse_spec(spec)
    teacher = build_model(src, pretrained=False)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model(src, pretrained=False)
    student.load_state_dict(state)
    dgmr.prune(student, mlp_ratio=1, progress=False)
    family = family_of(teacher)
    return teacher, student, family, family.image_size(teacher), state


def step_flops(teacher, student, family, x, autocast) -> tuple[int, int]:
    """(teacher forward FLOPs, student forward+backward FLOPs) for the batch ``x``."""
    c = FlopCounterMode(display=False)
    with torch.no_grad(), autocast(), c:
        family.features(teacher, x)
    t = c.get_total_flops()
    c = FlopCounterMode(display=False)
    with c:
        with autocast():
            s_feats = family.features(student, x)
        sum(v.float().pow(2).mean() for v in s_feats.values()).backward()
    student.zero_grad(set_to_none=True)
    return int(t), int(c.get_total_flops())


def bare_step(teacher, student, family, x, autocast, steps: int, compile_mode: str, attention: str) -> list[float]:
    """Seconds of every bare step, warm-up (compilation) included: the caller skips those."""
    t_fwd, s_fwd = FeatureNet(teacher, family), FeatureNet(student, family)
    if compile_mode != "off":
        mode = "max-autotune-no-cudagraphs" if compile_mode == "max-autotune" else None
        t_fwd, s_fwd = torch.compile(t_fwd, mode=mode), torch.compile(s_fwd, mode=mode)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                            fused=True if x.is_cuda else None)
    times = []
    for _ in range(steps + WARMUP):
        sync(x.device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(), attention_backend(attention):
            tf = t_fwd(x)
        with attention_backend(attention):
            with autocast():
                sf = s_fwd(x)
            feature_loss(sf, tf)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(x.device)
        times.append(time.perf_counter() - t0)
    return times


def write_jpegs(folder: Path, n: int, size: int) -> None:
    """``n`` smooth random JPEGs (low-frequency noise upsampled), ``size`` px, quality 90."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def run_distill(teacher, student, data: Path, args, compile_mode: str, attention: str) -> dict:
    """dgmr.distill on the JPEG folder; images/s from metrics.jsonl over every logged interval
    after the first, and after the first three (compilation and warm-up steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        r = distill(teacher, student, str(data), run, epochs=args.epochs, batch_size=args.batch_size,
                    log_every=args.log_every, save_every=0, workers=args.workers, lr=1e-5, progress=False,
                    device=args.device, tensorboard=False, compile=compile_mode, attention=attention)
        wall = time.perf_counter() - t0
        # the training steps' rows (step 0's row holds only the val_loss before training)
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [row for row in logged if "images_per_s" in row]

    def rate(skip: int) -> float:
        return (rows[-1]["images"] - rows[skip - 1]["images"]) / (rows[-1]["time"] - rows[skip - 1]["time"])

    return {"compile": compile_mode, "attention": attention, "steps": r["steps"], "epochs": r["epochs"],
            "wall_s": round(wall, 2), "images_per_s": rate(1), "images_per_s_after_warmup": rate(WARMUP),
            "slowest_interval_images_per_s": min(row["images_per_s"] for row in rows[1:]),
            "slowest_interval_after_warmup": min(row["images_per_s"] for row in rows[WARMUP:]),
            "intervals": [round(row["images_per_s"], 1) for row in rows]}


def variants(text: str) -> list[tuple[str, str]]:
    """'eager,on,on:cudnn' -> [("off", "auto"), ("on", "auto"), ("on", "cudnn")]: compile mode[:attention]."""
    out = []
    for v in filter(None, text.split(",")):
        mode, _, att = v.partition(":")
        out.append(("off" if mode == "eager" else mode, att or "auto"))
    return out


def name(v: tuple[str, str]) -> str:
    return ("eager" if v[0] == "off" else v[0]) + ("" if v[1] == "auto" else f":{v[1]}")


def on_device(args):
    """(teacher in the compute dtype, student in fp32 training mode, family, a batch, autocast) on ``--device``."""
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    teacher, student, family, size, _ = models(args.model, device, amp)
    teacher.eval().requires_grad_(False).to(device, dtype=amp)
    student.train().to(device)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    return teacher, student, family, x, (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext


def measure_steps(args, result, per_image, peak, deadline, teacher, student, family, x, autocast) -> None:
    for v in variants(args.step_variants):
        if time.perf_counter() > deadline:
            print(f"bare step ({name(v)}): skipped, past --deadline-s", flush=True)
            continue
        times = bare_step(teacher, student, family, x, autocast, args.steps, *v)
        ips = args.batch_size / statistics.median(times[WARMUP:])
        result["step"][name(v)] = {"images_per_s": ips, "mfu": ips * per_image / peak,
                                   "step_seconds": [round(t, 4) for t in times]}
        print(f"bare step ({name(v)}): {ips:.1f} img/s, MFU {ips * per_image / peak:.3f}; first steps "
              f"{', '.join(f'{t:.2f}' for t in times[:WARMUP + 1])} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


def measure_distill(args, result, per_image, peak, deadline) -> None:
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    if not variants(args.distill_variants):
        return
    with tempfile.TemporaryDirectory() as tmp:
        size = models(args.model, device, amp)[3]
        write_jpegs(Path(tmp) / "jpegs", args.images, size + 32)
        for v in variants(args.distill_variants):
            if time.perf_counter() > deadline:
                print(f"dgmr.distill ({name(v)}): skipped, past --deadline-s", flush=True)
                continue
            t2, s2, *_ = models(args.model, device, amp)
            r = run_distill(t2, s2, Path(tmp) / "jpegs", args, *v)
            bare = result["step"].get(name(v), {}).get("images_per_s")
            r["fraction_of_bare_step"] = r["images_per_s"] / bare if bare else None
            r["fraction_of_bare_step_after_warmup"] = r["images_per_s_after_warmup"] / bare if bare else None
            r["mfu"] = r["images_per_s"] * per_image / peak
            result["distill"].append(r)
            del t2, s2
            if device.type == "cuda":
                torch.cuda.empty_cache()
            frac = f"{r['fraction_of_bare_step']:.3f}" if bare else "n/a"
            print(f"dgmr.distill ({name(v)}, {args.workers} workers, {r['epochs']} epochs): {r['images_per_s']:.1f} "
                  f"img/s = {frac} of the bare step ({r['images_per_s_after_warmup']:.1f} img/s after the first "
                  f"{WARMUP} steps); slowest interval {r['slowest_interval_images_per_s']:.1f} img/s "
                  f"({r['slowest_interval_after_warmup']:.1f} after warm-up); wall {r['wall_s']} s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed bare steps (after the warm-up steps)")
    ap.add_argument("--images", type=int, default=64, help="JPEGs in the folder dgmr.distill reads")
    ap.add_argument("--epochs", type=float, default=2, help="epochs of the dgmr.distill runs")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the dgmr.distill runs")
    ap.add_argument("--log-every", type=int, default=1, help="steps per metrics interval of the dgmr.distill runs")
    ap.add_argument("--step-variants", default="eager", help="bare steps to time: comma-separated compile mode "
                    "(eager, on, max-autotune) with an optional :attention backend (cudnn, flash, ...)")
    ap.add_argument("--distill-variants", default="eager", help="dgmr.distill runs, same syntax ('' for none)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip the variants not started by then")
    ap.add_argument("--json", default=None, help="also write the result to this file (after every measurement)")
    args = ap.parse_args()
    deadline = time.perf_counter() + args.deadline_s
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    teacher, student, family, x, autocast = on_device(args)
    size = x.shape[-1]
    t_flops, s_flops = step_flops(teacher, student, family, x, autocast)
    per_image = (t_flops + s_flops) / args.batch_size
    peak = gemm_rate(amp or torch.float32, n=8192 if device.type == "cuda" else 2048, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": where, "torch": torch.__version__, "dtype": "bf16" if amp else "fp32", "model": args.model,
              "image_size": size, "batch_size": args.batch_size,
              "teacher_fwd_gflop_per_image": t_flops / args.batch_size / 1e9,
              "student_fwd_bwd_gflop_per_image": s_flops / args.batch_size / 1e9, "peak_tflop_s": peak / 1e12,
              "step": {}, "distill": []}
    print(f"{where}: peak {peak / 1e12:.1f} TFLOP/s ({'8192^3 bf16' if amp else '2048^3 fp32'} matmul); "
          f"{per_image / 1e9:.1f} GFLOP per image per step", flush=True)
    measure_steps(args, result, per_image, peak, deadline, teacher, student, family, x, autocast)
    del teacher, student, x  # free the device for the end-to-end runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measure_distill(args, result, per_image, peak, deadline)
    print(json.dumps({k: v for k, v in result.items() if k not in ("step", "distill")}))


if __name__ == "__main__":
    main()
