"""Images/s of one distillation step next to the compute bound (not a timed test).

Teacher: a ViT-S/16-sized model (timm ``vit_small_patch16_224``, random weights: the speed
does not depend on them). Student: its r=1 DGMR prune. For a batch at 224 px, a step is
teacher forward (no grad) + student forward + backward + AdamW update. The bound is

    images/s <= measured GEMM rate / (teacher fwd + student fwd+bwd FLOPs per image)

with FLOPs from ``torch.utils.flop_counter`` and the GEMM rate from a large matmul in the
same dtype (on a shared machine the rate drifts: it is also sampled right before every timed
step, and ``step_fraction_of_bound_interleaved`` is the median of the per-step fractions; the
end-to-end fraction uses the lower of the rates measured before and after). Two measurements:

* ``step``: the step alone on one fixed batch (the features, loss and optimizer code dgmr
  uses, no data loading);
* ``distill()``: the real function end to end on in-memory images (augmentation included),
  median images/s from its metrics.jsonl after the first steps.

On CPU everything is fp32; with a GPU the same runs in bf16 autocast (teacher in bf16).
``--curve-steps N`` also prints the loss per step of that end-to-end run.

    python benchmarks/distill_throughput.py [--batch-size 16] [--steps 6] [--device cpu|cuda] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import dgmr
from dgmr.distill import distill, feature_loss
from dgmr.models.families import family_of
from dgmr.models.sources import build_model, parse_spec


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Sustained FLOP/s of an n x n x n matmul (best of ``reps``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(teacher, student, family, x) -> tuple[int, int]:
    """(teacher forward FLOPs, student forward+backward FLOPs) for the batch ``x``."""
    c = FlopCounterMode(display=False)
    with torch.no_grad(), c:
        family.features(teacher, x)
    t = c.get_total_flops()
    c = FlopCounterMode(display=False)
    with c:
        s_feats = family.features(student, x)
        loss = sum(v.float().pow(2).mean() for v in s_feats.values())
        loss.backward()
    student.zero_grad(set_to_none=True)
    return int(t), int(c.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--curve-steps", type=int, default=0, help="also run distill() this long and print its losses")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)

    src = parse_spec(args.model)
    teacher = build_model(src, pretrained=False)
    student = build_model(src, pretrained=False)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.load_state_dict(t_state)
    dgmr.prune(student, mlp_ratio=1, progress=False)
    family = family_of(teacher)
    size = family.image_size(teacher)
    teacher.eval().requires_grad_(False).to(device, dtype=amp)
    student.train().to(device)
    x = torch.randn(args.batch_size, 3, size, size, device=device)

    t_flops, s_flops = step_flops(teacher, student, family, x.to(amp) if amp else x)
    per_image = (t_flops + s_flops) / args.batch_size
    rate = gemm_rate(device, amp or torch.float32)
    bound = rate / per_image

    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    times, fractions = [], []
    for i in range(args.steps + 2):
        # the machine may be shared: sample the GEMM rate right before each step, compare step by step
        rate_now = gemm_rate(device, amp or torch.float32, n=1024, reps=2)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            tf = family.features(teacher, x)
        with autocast():
            sf = family.features(student, x)
        loss = feature_loss(sf, tf)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            dt = time.perf_counter() - t0
            times.append(dt)
            fractions.append(args.batch_size / dt / (rate_now / per_image))
    step_ips = args.batch_size / statistics.median(times)

    # the real function, end to end, on in-memory images (a fresh copy of the student)
    n_steps = max(args.curve_steps, args.steps + 2)
    images = torch.rand(args.batch_size * 2, 3, size + 32, size + 32)
    teacher2, student2 = build_model(src, pretrained=False), build_model(src, pretrained=False)
    teacher2.load_state_dict(t_state)
    student2.load_state_dict(t_state)
    dgmr.prune(student2, mlp_ratio=1, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        distill(teacher2, student2, list(images), run, steps=n_steps, batch_size=args.batch_size, log_every=1,
                lr=2e-4, warmup_steps=1, progress=False, device=args.device, tensorboard=False)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    e2e_ips = statistics.median(r["images_per_s"] for r in rows[2:])
    rate_after = gemm_rate(device, amp or torch.float32)

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": "bf16" if amp else "fp32",
        "threads": torch.get_num_threads(),
        "model": args.model, "image_size": size, "batch_size": args.batch_size,
        "teacher_fwd_gflop_per_image": t_flops / args.batch_size / 1e9,
        "student_fwd_bwd_gflop_per_image": s_flops / args.batch_size / 1e9,
        "gemm_gflop_s": rate / 1e9,
        "gemm_gflop_s_after": rate_after / 1e9,
        "bound_images_per_s": bound,
        "step_images_per_s": step_ips,
        "step_fraction_of_bound": step_ips / bound,
        "step_fraction_of_bound_interleaved": statistics.median(fractions),
        "distill_images_per_s": e2e_ips,
        "distill_fraction_of_bound": e2e_ips / (min(rate, rate_after) / per_image),
        "loss_curve": [round(r["loss"], 5) for r in rows] if args.curve_steps else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for k, v in result.items():
        print(f"{k:>34}: {v:.4g}" if isinstance(v, float) else f"{k:>34}: {v}")


if __name__ == "__main__":
    main()
