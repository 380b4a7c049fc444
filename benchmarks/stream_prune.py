"""Streaming prune of a multi-billion-parameter checkpoint: peak memory, wall time, selection speed.

Not a timed test. Steps:

1. ``selection``: one MLP layer of the model (random bf16 weights, the real shape), timed
   with ``dgmr.prune.pivot.pivot_order`` in float32 and float64, next to the 2*h*d*n flop bound
   at the GEMM rate measured just before, LAPACK ``geqp3`` (scipy) and the naive greedy loop
   (timed on ``--naive-picks`` picks and extrapolated; each pick costs the same). The first
   ``--naive-picks`` picks are compared with the naive loop's (``--check-naive`` runs the
   naive loop in full for an exact comparison of every pick; slow).
2. ``checkpoint``: a synthetic checkpoint with the exact tensor names and shapes of the open_clip
   model's vision tower (``--model``, default ``EVA02-E-14-plus``: 4.35B params, 8.7 GB; names
   ``visual.*`` from the meta-device model; ``--with-text`` adds the text tower), random bf16
   weights, written shard by shard (``--shard-size``).
3. ``prune``: ``dgmr prune open_clip:MODEL --weights INDEX --mlp-ratio R --max-memory M`` in a
   child process under ``/usr/bin/time -v`` (peak RSS from the kernel), its JSON summary,
   and the per-layer selection seconds it recorded.
4. ``verify``: the output's tensor names and shapes are exactly those of the pruned
   architecture; ``dgmr.load`` opens it in a child process (peak RSS and seconds measured;
   a tower-only output loads as the tower); and ``--verify-blocks`` blocks are compared bit
   for bit with the in-memory ``dgmr.prune`` of that block's MLP built from the same input
   tensors.

    python benchmarks/stream_prune.py [--model EVA02-E-14-plus|ViT-g-14|ViT-bigG-14] [--mlp-ratio 1]
        [--max-memory 3GB] [--workdir DIR] [--select-dtype float64] [--with-text] [--keep] [--json]

Needs ~1.3x the checkpoint size of free disk (EVA02-E-14-plus vision tower: 8.7 GB in + 2.5 GB out).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import save_file
from torch import nn

import dgmr
from dgmr.prune.pivot import pivot_order
from dgmr.models.artifact import read_config
from dgmr.models.families import GenericFamily, apply_widths, family_of
from dgmr.models.sources import build_model, parse_spec
from dgmr.io.checkpoints import SHARD_INDEX as INDEX
from dgmr.prune.stream import open_checkpoint, parse_size

from bench_utils import gemm_rate, naive_greedy as naive


def bench_selection(h: int, d: int, n: int, naive_picks: int, check_naive: bool) -> dict:
    w = torch.randn(h, d, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out: dict = {"shape": [h, d], "picks": n, "threads": torch.get_num_threads(), "flops": 2 * h * d * n}
    orders = {}
    for name in ("float32", "float64"):
        dt = getattr(torch, name)
        rate = gemm_rate(dt)
        x = w.to(dt)
        t = time.perf_counter()
        orders[name] = pivot_order(x, n)
        sec = time.perf_counter() - t
        bound = 2 * h * d * n / rate
        out[name] = {"seconds": round(sec, 2), "gemm_gflops": round(rate / 1e9, 1), "bound_s": round(bound, 2),
                     "x_bound": round(sec / bound, 2)}
    out["float64"]["x_float32_bound"] = round(out["float64"]["seconds"] / out["float32"]["bound_s"], 2)
    out["float32_picks_equal_float64"] = bool(torch.equal(orders["float32"], orders["float64"]))
    a = np.array(w.float().numpy(), order="C")
    t = time.perf_counter()
    _, piv = scipy.linalg.qr(a.T, mode="r", pivoting=True, overwrite_a=True, check_finite=False)
    out["geqp3_float32_s"] = round(time.perf_counter() - t, 2)
    out["geqp3_picks_equal"] = bool(torch.equal(torch.from_numpy(piv[:n]).long(), orders["float64"]))
    m = n if check_naive else min(naive_picks, n)
    ref, sec = naive(w.double(), m)
    out["naive_float64_s"] = round(sec * n / m, 1)
    out["naive_extrapolated_from_picks"] = m
    out["naive_picks_equal"] = {k: bool(torch.equal(o[:m], ref)) for k, o in orders.items()}
    out["speedup_vs_naive"] = {k: round(out["naive_float64_s"] / out[k]["seconds"], 1) for k in ("float32", "float64")}
    return out


def write_checkpoint(model: nn.Module, d: Path, shard_bytes: int, prefix: str = "") -> tuple[Path, int]:
    """Random bf16 tensors with the model's names (those starting with ``prefix``) and shapes,
    written one shard at a time."""
    d.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}
    groups: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        nb = int(np.prod(s)) * 2
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nb
    weight_map, total, g = {}, 0, torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in names}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in part.values())
        weight_map.update({k: fname for k in names})
        del part
        print(f"  wrote {fname} ({i + 1}/{len(groups)})", file=sys.stderr, flush=True)
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return d / INDEX, total


def run_prune(spec: str, index: Path, out: Path, ratio: float, max_memory: str, select_dtype: str) -> dict:
    return run_child("import json, sys; from dgmr.prune.stream import stream_prune; "
                     f"r = stream_prune({spec!r}, {str(index)!r}, {str(out)!r}, mlp_ratio={ratio}, "
                     f"max_memory={max_memory!r}, select_dtype={select_dtype!r}, progress=True); "
                     "print('RESULT ' + json.dumps(r))")


def run_load(out: Path) -> dict:
    """``dgmr.load`` of the output in a child process: seconds, parameters, peak RSS."""
    return run_child("import json, time, torch, dgmr; t = time.perf_counter(); "
                     f"m = dgmr.load({str(out)!r}); s = time.perf_counter() - t; "
                     "ts = [*m.parameters(), *m.buffers()]; "
                     "print('RESULT ' + json.dumps({'class': type(m).__name__, 'load_s': round(s, 1), "
                     "'params': sum(p.numel() for p in m.parameters()), 'meta_tensors': sum(t.is_meta for t in ts), "
                     "'finite': all(bool(torch.isfinite(p).all()) for p in m.parameters())}))")


def run_child(code: str) -> dict:
    """Run ``code`` in a child Python (under ``/usr/bin/time -v`` when there is one)."""
    cmd = [sys.executable, "-c", code]
    timed = Path("/usr/bin/time").is_file()
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    res["wall_s"] = round(wall, 1)
    if timed:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        res["peak_rss_time_v_bytes"] = int(m.group(1)) * 1024 if m else None
    return res


def verify(spec: str, index: Path, out: Path, blocks: int) -> dict:
    cfg = read_config(out)
    src = parse_spec(spec)
    meta = build_model(src, meta=True)
    fam = family_of(meta)
    sites = fam.mlps(meta)
    orig_site_modules = {s.name: copy.deepcopy(s.module) for s in sites}
    apply_widths(meta, {k: int(v) for k, v in cfg["widths"].items()}, fam)
    scope = cfg.get("weights_scope")
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items() if not scope or k.startswith(scope + ".")}
    got = open_checkpoint(out / cfg["weights"])
    names_ok = set(want) == set(got.tensors)
    shapes_ok = names_ok and all(tuple(got.tensors[k].shape) == want[k] for k in want)
    src_ckpt = open_checkpoint(index)
    picks = sorted({0, len(sites) // 2, len(sites) - 1})[:blocks] if blocks else []
    same = {}
    for i in picks:
        s = sites[i]
        mod = orig_site_modules[s.name].to_empty(device="cpu")
        local = list(mod.state_dict())
        vals = src_ckpt.read([f"{s.name}.{n}" for n in local])
        mod.load_state_dict({n: vals[f"{s.name}.{n}"] for n in local})
        wrapper = nn.ModuleDict({"mlp": mod})
        dgmr.prune(wrapper, widths=[cfg["widths"][s.name]], family=GenericFamily(), progress=False)
        ref = {f"{s.name}.{n}": t for n, t in mod.state_dict().items()}
        outv = got.read(list(ref))
        same[s.name] = all(torch.equal(ref[n], outv[n]) for n in ref)
    return {"names_match": names_ok, "shapes_match": shapes_ok, "blocks_equal_in_memory_prune": same,
            "dgmr_load": run_load(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="EVA02-E-14-plus", help="open_clip architecture (EVA02-E-14-plus, ViT-g-14, ViT-bigG-14)")
    ap.add_argument("--mlp-ratio", type=float, default=1.0)
    ap.add_argument("--max-memory", default="3GB")
    ap.add_argument("--select-dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--shard-size", default="2GB", help="shard size of the synthetic input checkpoint")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--naive-picks", type=int, default=40)
    ap.add_argument("--check-naive", action="store_true", help="run the naive loop in full (slow: minutes)")
    ap.add_argument("--verify-blocks", type=int, default=3)
    ap.add_argument("--with-text", action="store_true", help="write the text tower into the checkpoint too")
    ap.add_argument("--skip-selection", action="store_true")
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    spec = f"open_clip:{args.model}"
    meta = build_model(parse_spec(spec), meta=True)
    fam = family_of(meta)
    site = fam.mlps(meta)[0]
    h, d = site.hidden, site.in_features * (2 if site.gated else 1)
    k = int(round(args.mlp_ratio * site.in_features))
    report: dict = {"model": spec, "mlp_layers": len(fam.mlps(meta)), "layer": [h, d], "k": k}
    if not args.skip_selection:
        print(f"selection: one {h}x{d} layer, {min(k, d)} picks ...", file=sys.stderr, flush=True)
        report["selection"] = bench_selection(h, d, min(k, d, h), args.naive_picks, args.check_naive)
        print(json.dumps(report["selection"], indent=1), file=sys.stderr)
    if not args.skip_prune:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="dgmr-stream-bench-"))
        try:
            print(f"checkpoint: writing {spec} to {work / 'in'} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            tower = "" if args.with_text else fam.vision_root(meta)[0] + "."
            index, nbytes = write_checkpoint(meta, work / "in", parse_size(args.shard_size), tower)
            report["checkpoint"] = {"bytes": nbytes, "params": nbytes // 2, "write_s": round(time.perf_counter() - t, 1)}
            print("prune: streaming ...", file=sys.stderr, flush=True)
            res = run_prune(spec, index, work / "out", args.mlp_ratio, args.max_memory, args.select_dtype)
            layers = read_config(work / "out")["prune"]["layers"]
            sel = sorted(layer["select_seconds"] for layer in layers)
            res["select_seconds_median"] = sel[len(sel) // 2]
            res["select_seconds_total"] = round(sum(sel), 1)
            report["prune"] = res
            report["verify"] = verify(spec, index, work / "out", args.verify_blocks)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, val in report.items():
            print(f"{key:>12}: {json.dumps(val)}")


if __name__ == "__main__":
    main()
