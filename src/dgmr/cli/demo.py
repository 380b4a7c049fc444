"""The ``demo`` sub-command (see :mod:`dgmr.demo`)."""
from __future__ import annotations

import argparse
from typing import Any


def _demo(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..demo import run_demo
    from ..report.demo import print_table

    results = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.json)
    if args.json:
        return results
    print_table(results)
    print(f"\nwrote {args.out}/report.md, results.json, recovery.png, accuracy_vs_flops.png "
          f"in {results['wall_seconds']:.0f} s")
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole method end to end on bundled handwritten digits (offline, CPU, minutes)",
                       description="Train a small ViT on scikit-learn's digits, prune it with diversity/l2/random at "
                                   "r=1 and r=0.5, distill each student on the unlabeled images, evaluate everything "
                                   "and write report.md, results.json and plots.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo); a trained teacher "
                                                        "there is reused")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed (weights-only students use seed and seed+1, calibrated ones seed to seed+2)")
    p.add_argument("--quick", action="store_true", help="one seed and short runs (under a minute)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.set_defaults(func=_demo)
