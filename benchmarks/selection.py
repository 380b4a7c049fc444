"""Time one full round of `diversity` selection at real layer shapes, side by side.

For each layer shape (default: the MLP fc1 of ViT-B, ViT-L, ViT-H, ViT-g and EVA-CLIP-E at
r = 1, i.e. n = d picks: the costliest round) this prints, all measured in this one run:
- `dgmr`: dgmr's selection (`greedy_order`, method chosen for the device and shape),
- on the CPU also `lazy` (the lazy blocked greedy) and `geqp3` (LAPACK QRCP via scipy),
- `textbook`: the plain loop (largest residual, project it out of every residual) on the same
  device, timed on its first --naive-picks picks and extrapolated (every pick costs the same),
- `bound`: 2*h*d*n flops at the device's measured float64 GEMM rate,
- `same`: dgmr's picks equal geqp3's (CPU) / the CPU selection's (GPU), all n of them, and the
  textbook loop's first --naive-picks.

    python benchmarks/selection.py [--shapes vit-b,vit-l,3072x768] [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dgmr.prune.pivot import _QRCP_MAX, _qrcp_pivot_order, greedy_order, pivot_order

from bench_utils import gemm_rate, naive_greedy, sync

SHAPES = {"vit-b": (3072, 768), "vit-l": (4096, 1024), "vit-h": (5120, 1280), "vit-g": (6144, 1408),
          "eva-e": (15360, 1792)}


def timed(fn, w: torch.Tensor, repeats: int) -> tuple[torch.Tensor, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        sync(w.device)
        t = time.perf_counter()
        out = fn(w)
        sync(w.device)
        times.append(time.perf_counter() - t)
    return out, times


def one_shape(name: str, h: int, d: int, device: str, rate: float, args) -> dict:
    w = torch.randn(h, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wd = w.to(device)
    row = {"shape": name, "h": h, "d": d, "device": device}
    greedy_order(wd, min(64, d))  # warm-up (CUDA context, cuBLAS handles)
    got, row["dgmr_s"] = timed(lambda x: greedy_order(x, d), wd, args.repeats)
    row["method"] = "cholesky" if wd.is_cuda else "qrcp" if w.numel() <= _QRCP_MAX else "lazy"
    if device == "cpu":
        _, row["lazy_s"] = timed(lambda x: pivot_order(x, d), w, args.repeats)
        ref, row["geqp3_s"] = timed(lambda x: _qrcp_pivot_order(x, d), w, args.repeats)
        row["same_as_geqp3"] = bool(torch.equal(got, ref))
    else:
        row["same_as_cpu"] = bool(torch.equal(got, greedy_order(w, d)))
    k = min(args.naive_picks, d)
    naive_greedy(wd, 2)  # warm-up (first use of its kernels)
    first, t_part = naive_greedy(wd, k)
    row["textbook_s"] = t_part * d / k
    row["same_as_textbook_first"] = bool(torch.equal(got[:k], first))
    row["bound_s"] = 2 * h * d * d / rate
    best = min(row["dgmr_s"])
    row["speedup_vs_textbook"] = row["textbook_s"] / best
    row["x_bound"] = best / row["bound_s"]
    if device == "cpu":
        row["vs_geqp3"] = min(row["geqp3_s"]) / best
    return row


def fmt(v: list[float] | float) -> str:
    if isinstance(v, list):
        return f"{statistics.median(v):.3f}" + (f" ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else "")
    return f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated names ({', '.join(SHAPES)}) or HxD")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--naive-picks", type=int, default=100, help="picks of the textbook loop to time")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each method (median and range shown)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    rate = gemm_rate(torch.float64, n=4096 if args.device != "cpu" else 2048, device=args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}: float64 GEMM {rate / 1e9:.1f} GFLOP/s; seconds are medians (range) of {args.repeats} runs")
    rows = []
    for spec in args.shapes.split(","):
        h, d = SHAPES.get(spec) or tuple(int(v) for v in spec.lower().split("x"))
        row = one_shape(spec, h, d, args.device, rate, args)
        rows.append(row)
        extra = (f" lazy {fmt(row['lazy_s'])} geqp3 {fmt(row['geqp3_s'])} -> {row['vs_geqp3']:.2f}x geqp3,"
                 f" same picks as geqp3: {row['same_as_geqp3']}" if args.device == "cpu"
                 else f" same picks as the CPU: {row['same_as_cpu']}")
        print(f"{spec:>7} {h}x{d}: dgmr ({row['method']}) {fmt(row['dgmr_s'])} s;{extra}; textbook {row['textbook_s']:.2f} s "
              f"-> {row['speedup_vs_textbook']:.1f}x; bound {row['bound_s']:.4f} s -> {row['x_bound']:.1f}x bound; "
              f"first {min(args.naive_picks, d)} picks as textbook: {row['same_as_textbook_first']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "gemm_float64_flops": rate, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
