"""Peak memory of ``dgmr import`` on a ViT-bigG-sized checkpoint pruned elsewhere.

Not a timed test. Steps:

1. ``checkpoint``: a synthetic safetensors checkpoint of open_clip ``ViT-bigG-14``'s vision
   tower (names ``visual.*`` and shapes from the meta-device model, every MLP cut to
   ``--mlp-ratio`` x width, a different width in every other block so no single ratio
   describes it), random bf16 values written shard by shard (``--shard-size``).
2. ``import``: ``dgmr import open_clip:ViT-bigG-14 INDEX --out OUT --json`` in a child
   process under ``/usr/bin/time -v`` (peak RSS from the kernel), next to the checkpoint's size.
3. ``load``: ``dgmr.load`` of the output in a child process (peak RSS, seconds).

    python benchmarks/import_memory.py [--format safetensors|pth] [--mlp-ratio 4] [--shard-size 2GB] [--workdir DIR] [--keep] [--json]

Needs about twice the checkpoint size of free disk (at r = 4: 3.2 GB in + 3.2 GB out).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from dgmr.models.families import apply_widths, family_of
from dgmr.models.sources import build_model, parse_spec
from dgmr.prune.stream import parse_size

from stream_prune import run_child, run_load, write_checkpoint

SPEC = "open_clip:ViT-bigG-14"


def write_pickle(model, d: Path, prefix: str) -> tuple[Path, int]:
    """The same tensors as one torch pickle nested under ``model`` (as a training run saves it;
    this writer holds them all in memory, the import must not)."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
          for k, v in model.state_dict().items() if k.startswith(prefix)}
    torch.save({"model": sd, "epoch": 0}, d / "distill.pth")
    return d / "distill.pth", sum(t.numel() * 2 for t in sd.values())


def make_checkpoint(d: Path, ratio: float, shard_bytes: int, fmt: str) -> tuple[Path, int, dict[str, int]]:
    meta = build_model(parse_spec(SPEC), meta=True)
    family = family_of(meta)
    sites = family.mlps(meta)
    # every other block 64 neurons narrower: per-layer widths, as a release pruned elsewhere may have
    widths = {s.name: int(round(ratio * s.in_features)) - (64 if i % 2 else 0) for i, s in enumerate(sites)}
    apply_widths(meta, widths, family)
    if fmt == "pth":
        index, total = write_pickle(meta, d, "visual.")
    else:
        index, total = write_checkpoint(meta, d, shard_bytes, prefix="visual.")
    return index, total, widths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP width / embed dim of the synthetic checkpoint")
    ap.add_argument("--format", choices=("safetensors", "pth"), default="safetensors",
                    help="checkpoint format: safetensors shards, or one torch pickle (read memory-mapped)")
    ap.add_argument("--shard-size", default="2GB", help="shard size of the synthetic checkpoint")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary directory in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dgmr-import-bench-"))
    try:
        index, ckpt_bytes, widths = make_checkpoint(work / "ckpt", args.mlp_ratio, parse_size(args.shard_size),
                                                   args.format)
        out = work / "imported"
        # RssAnon (sampled): the process's own memory, without the clean file pages a memory-mapped
        # pickle leaves in RSS (page cache the kernel takes back under pressure)
        imp = run_child("import json, re, threading; from pathlib import Path; "
                        "from dgmr.prune.importer import import_checkpoint; peak = [0]; stop = threading.Event()\n"
                        "def watch():\n"
                        "    while not stop.wait(0.02):\n"
                        "        kb = int(re.search(r'RssAnon:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1))\n"
                        "        peak[0] = max(peak[0], kb * 1024)\n"
                        "threading.Thread(target=watch, daemon=True).start()\n"
                        f"r = import_checkpoint({SPEC!r}, {str(index)!r}, {str(out)!r}, overwrite=True)\n"
                        "stop.set(); r['peak_rss_anon_bytes'] = peak[0]; print('RESULT ' + json.dumps(r))")
        load = run_load(out)
        res = {"model": SPEC, "format": args.format, "mlp_widths": sorted(set(widths.values())), "checkpoint_bytes": ckpt_bytes,
               "import_peak_rss_bytes": imp.get("peak_rss_time_v_bytes"), "import_wall_s": imp["wall_s"],
               "import_peak_rss_in_process_bytes": imp["peak_rss_bytes"],
               "import_peak_rss_anon_bytes": imp["peak_rss_anon_bytes"], "output_bytes": imp["output_bytes"],
               "weights_scope": imp["weights_scope"], "load": load}
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            gb = 1e9
            rss = res["import_peak_rss_bytes"] or res["import_peak_rss_in_process_bytes"]
            print(f"{SPEC} vision tower, MLP widths {res['mlp_widths']}: {args.format} checkpoint "
                  f"{ckpt_bytes / gb:.2f} GB (bf16)")
            print(f"dgmr import: peak RSS {rss / gb:.2f} GB ({rss / ckpt_bytes:.2f}x the checkpoint), "
                  f"{res['import_wall_s']} s wall; output {res['output_bytes'] / gb:.2f} GB")
            print(f"  of which anonymous (not file pages): peak {res['import_peak_rss_anon_bytes'] / gb:.2f} GB")
            peak = load.get("peak_rss_time_v_bytes")
            print(f"dgmr.load of the output: {load['load_s']} s, peak RSS {peak / gb:.2f} GB" if peak else
                  f"dgmr.load of the output: {load['load_s']} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
