"""What the durable writes cost: fsync of every file before its rename and of its directory after
(``dgmr.io.output``), against ``DGMR_FSYNC=0``, measured side by side in one run.

Three writers: ``dgmr.save`` of a ViT-B/16-sized model (timm's architecture, random weights,
~350 MB), ``write_json`` of a small result file (what eval --save, run configs and reports
write) and the distill checkpoint's ``atomic_path`` of a torch file. Each is timed alternately
with and without fsync, median of ``--repeats``. Run it on the disk you care about
(``--dir``): a RAM-backed tmpfs makes fsync free, a network file system the opposite.

    python benchmarks/durable_writes.py --dir /scratch/you [--repeats 5] [--model vit_base_patch16_224]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn, fsync: bool) -> float:
    os.environ["DGMR_FSYNC"] = "1" if fsync else "0"
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm architecture of the saved model")
    ap.add_argument("--small-files", type=int, default=200, help="write_json calls per measurement")
    args = ap.parse_args()

    import timm

    import dgmr
    from dgmr.io.output import atomic_path, write_json
    from dgmr.models.sources import Source

    root = Path(tempfile.mkdtemp(prefix="dgmr-durable-", dir=args.dir))
    try:
        src = Source("timm", args.model)
        model = timm.create_model(args.model, pretrained=False).eval()
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        state = {"step": 1, "w": torch.randn(4 << 20)}  # a 16 MB checkpoint

        def save_model() -> None:
            dgmr.save(model, root / "model", source=src, overwrite=True, native=False)

        def small_files() -> None:
            for i in range(args.small_files):
                write_json(root / f"r{i % 10}.json", {"top1": 0.5, "i": i})

        def checkpoint() -> None:
            with atomic_path(root / "checkpoint.pt") as tmp:
                torch.save(state, tmp)

        rows = [(f"dgmr.save {args.model} ({size / 2**20:.0f} MiB)", save_model),
                (f"write_json x {args.small_files}", small_files),
                ("checkpoint (16 MiB torch.save)", checkpoint)]
        print(f"writing under {root} ({args.repeats} repeats, median; fsync on vs DGMR_FSYNC=0, alternating)")
        for name, fn in rows:
            fn()  # warm-up: page cache, first-write allocations
            on, off = [], []
            for _ in range(args.repeats):
                on.append(_timed(fn, True))
                off.append(_timed(fn, False))
            a, b = statistics.median(on), statistics.median(off)
            print(f"{name:<48} fsync {a:8.3f} s   no fsync {b:8.3f} s   cost {a - b:+8.3f} s ({a / b:5.2f}x)")
    finally:
        os.environ.pop("DGMR_FSYNC", None)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
