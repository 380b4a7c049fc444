"""The ``prune`` and ``stats`` sub-commands."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import DgmrError


def model_kwargs_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_width_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mlp-ratio", type=float, help="keep round(R * embed_dim) hidden neurons per MLP (the paper's r)")
    g.add_argument("--hidden", type=int, help="keep N hidden neurons per MLP")
    g.add_argument("--keep-fraction", type=float, help="keep this fraction of each MLP's hidden neurons")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR, or a dgmr directory")
    p.add_argument("--model-kwargs", type=model_kwargs_arg, default=None, metavar="JSON",
                   help="extra architecture arguments (timm create_model kwargs, open_clip create_model kwargs, "
                        "HF config overrides), e.g. '{\"img_size\": 64}'")


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline import prune_to_dir

    if args.mlp_ratio is None and args.hidden is None and args.keep_fraction is None:
        raise DgmrError("say how wide to keep the MLPs: --mlp-ratio R, --hidden N or --keep-fraction F")
    if args.weights is not None:
        from .stream import stream_prune

        if args.random_init:
            raise DgmrError("--random-init and --weights exclude each other (the weights come from --weights)")
        return stream_prune(args.model, args.weights, args.out, mlp_ratio=args.mlp_ratio, hidden=args.hidden,
                            keep_fraction=args.keep_fraction, criterion=args.criterion, seed=args.seed,
                            model_kwargs=args.model_kwargs, dtype=args.dtype, max_memory=args.max_memory,
                            shard_size=args.shard_size, overwrite=args.overwrite, native=not args.no_native,
                            progress=not args.json)
    if args.max_memory is not None or args.shard_size is not None:
        raise DgmrError("--max-memory and --shard-size apply to streaming prune only: give the checkpoint with --weights")
    return prune_to_dir(args.model, args.out, mlp_ratio=args.mlp_ratio, hidden=args.hidden,
                        keep_fraction=args.keep_fraction, criterion=args.criterion, seed=args.seed,
                        random_init=args.random_init, dtype=args.dtype, overwrite=args.overwrite,
                        model_kwargs=args.model_kwargs, native=not args.no_native, progress=not args.json)


def _stats(args: argparse.Namespace) -> dict[str, Any]:
    from .stats import stats

    return stats(args.model, mlp_ratio=args.mlp_ratio, hidden=args.hidden, keep_fraction=args.keep_fraction,
                 image_size=args.image_size, model_kwargs=args.model_kwargs)


def _demo(args: argparse.Namespace) -> dict[str, Any] | None:
    from .demo import print_table, run_demo

    results = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.json)
    if args.json:
        return results
    print_table(results)
    print(f"\nwrote {args.out}/report.md, results.json, recovery.png, accuracy_vs_flops.png "
          f"in {results['wall_seconds']:.0f} s")
    return None


def register(sub: argparse._SubParsersAction) -> None:
    from .criteria import CRITERIA
    from .pipeline import DTYPES

    p = sub.add_parser("prune", help="prune every MLP of a vision tower (weights-only, no data)",
                       description="Keep the most diverse hidden neurons of every MLP (greedy Gram-Schmidt on "
                                   "fc1) and save the smaller model as model.safetensors + config.json, plus the "
                                   "source library's own format.")
    add_model_args(p)
    add_width_args(p)
    p.add_argument("--criterion", default="diversity", choices=sorted(CRITERIA), help="neuron selection (default: diversity)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random criterion")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--random-init", action="store_true", help="build the architecture with random weights (no download)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the saved weights (default: as loaded)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-native", action="store_true", help="skip the export in the source library's own format")
    p.add_argument("--weights", metavar="FILE_OR_INDEX", default=None,
                   help="streaming prune: read the weights from this safetensors file, model.safetensors.index.json "
                        "or directory, one MLP at a time (MODEL gives the architecture only; bounded memory)")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="with --weights: resident-memory budget, e.g. 3GB (sizes output shards and parallel layers)")
    p.add_argument("--shard-size", metavar="SIZE", default=None,
                   help="with --weights: write HF-style shards of at most SIZE (e.g. 2GB) instead of one "
                        "model.safetensors (Hugging Face models are always sharded, into DIR/hf/)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_prune)

    p = sub.add_parser("stats", help="params and FLOPs before/after pruning (meta device: no weights, no download)")
    add_model_args(p)
    add_width_args(p)
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_stats)

    p = sub.add_parser("demo", help="the whole method end to end on bundled handwritten digits (offline, CPU, minutes)",
                       description="Train a small ViT on scikit-learn's digits, prune it with diversity/l2/random at "
                                   "r=1 and r=0.5, distill each student on the unlabeled images, evaluate everything "
                                   "and write report.md, results.json and plots.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo); a trained teacher "
                                                        "there is reused")
    p.add_argument("--seed", type=int, default=0, help="base seed (students use seed, seed+1, seed+2)")
    p.add_argument("--quick", action="store_true", help="one seed and short runs (under a minute)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.set_defaults(func=_demo)
