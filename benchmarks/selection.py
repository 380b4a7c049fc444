"""Time `diversity` selection against the naive greedy Gram-Schmidt loop, side by side.

For each layer shape (ViT-L 4096x1024, EVA-CLIP-E 15360x1792 by default) this prints:
- `dgmr`: wall time of dgmr.select_neurons(w, k=d) (one full round, the costliest),
- `naive`: the plain loop (pick the largest residual, project it out of every residual),
  timed on its first --naive-picks picks and extrapolated linearly (each pick costs the same),
- the ratio, and the time the 2*h*d^2 flop bound takes at this machine's measured GEMM rate,
- whether the first --naive-picks picks are identical.

    python benchmarks/selection.py [--shapes 4096x1024,15360x1792] [--dtype float64]
"""
from __future__ import annotations

import argparse
import time

import torch

from dgmr import select_neurons
from dgmr.prune.criteria import diversity

from bench_utils import gemm_rate, naive_greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x1024,15360x1792", help="comma-separated HxD layer shapes")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="selection dtype")
    ap.add_argument("--naive-picks", type=int, default=200, help="picks of the naive loop to time")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    rate = gemm_rate(dtype)
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} measured GEMM rate: {rate / 1e9:.1f} GFLOP/s")
    print(f"{'shape':>12} {'dgmr s':>8} {'naive s (extrap.)':>18} {'speedup':>8} {'bound s':>8} {'x bound':>8} {'same picks':>10}")
    for spec in args.shapes.split(","):
        h, d = (int(v) for v in spec.lower().split("x"))
        w = torch.randn(h, d, generator=torch.Generator().manual_seed(0)).to(dtype)
        t = time.perf_counter()
        select_neurons(w, d, dtype=dtype)
        t_dgmr = time.perf_counter() - t
        order = diversity(w, args.naive_picks)  # the greedy order of the first picks
        n = min(args.naive_picks, d)
        ref, t_naive_part = naive_greedy(w, n)
        t_naive = t_naive_part * d / n
        bound = 2 * h * d * d / rate
        same = bool(torch.equal(order[:n], ref))
        print(f"{spec:>12} {t_dgmr:8.2f} {t_naive:18.1f} {t_naive / t_dgmr:7.1f}x {bound:8.2f} {t_dgmr / bound:7.1f}x {str(same):>10}")


if __name__ == "__main__":
    main()
