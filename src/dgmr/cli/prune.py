"""The ``prune`` and ``stats`` sub-commands (see :func:`dgmr.prune_to_dir`, :mod:`dgmr.prune.stream`)."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import DgmrError
from .args import add_model_args, add_width_args
from .settings import add_settings, given, given_flags


def _check_calibration(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration settings given; refuses those that cannot apply."""
    from ..prune.calibrate import CalibrationSettings
    from ..prune.criteria import criterion_scores

    settings = given(args, CalibrationSettings)
    if args.calibration is None:
        if settings:
            raise DgmrError(f"{given_flags(args, CalibrationSettings)[0]} applies to calibrated pruning only: "
                            "give --calibration DATA")
        if criterion_scores(args.criterion) == "activations":
            raise DgmrError(f"--criterion {args.criterion} scores activations: give --calibration DATA "
                            "(a folder, a list file or shards of unlabeled images)")
    elif args.weights is not None:
        raise DgmrError("--calibration and --weights exclude each other: calibration runs the whole model over "
                        "images, streaming prune never holds it; prune in memory (without --weights) to calibrate")
    return settings


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    from ..prune.to_dir import prune_to_dir

    if args.mlp_ratio is None and args.hidden is None and args.keep_fraction is None:
        raise DgmrError("say how wide to keep the MLPs: --mlp-ratio R, --hidden N or --keep-fraction F")
    calibration_settings = _check_calibration(args)
    if args.weights is not None:
        from ..prune.stream import stream_prune

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
                        model_kwargs=args.model_kwargs, native=not args.no_native, progress=not args.json,
                        calibration=args.calibration, calibration_settings=calibration_settings)


def _stats(args: argparse.Namespace) -> dict[str, Any]:
    from ..prune.stats import stats

    return stats(args.model, mlp_ratio=args.mlp_ratio, hidden=args.hidden, keep_fraction=args.keep_fraction,
                 image_size=args.image_size, model_kwargs=args.model_kwargs)


def register(sub: argparse._SubParsersAction) -> None:
    from ..dtypes import DTYPES
    from ..prune.calibrate import CalibrationSettings
    from ..prune.criteria import CRITERIA

    p = sub.add_parser("prune", help="prune every MLP of a vision tower (weights-only; --calibration refits on images)",
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
    title = "calibration (docs/calibration.md)"
    cal = p.add_argument_group(title)
    cal.add_argument("--calibration", metavar="DATA", default=None,
                     help="unlabeled images (a folder, a .txt list, WebDataset shards) to calibrate the cut: refit "
                          "each cut MLP to the original's output, allow --criterion diversity-act and --allocate global")
    add_settings(p, CalibrationSettings, group=title, groups={title: cal})
    p.set_defaults(func=_prune)

    p = sub.add_parser("stats", help="params and FLOPs before/after pruning (meta device: no weights, no download)")
    add_model_args(p)
    add_width_args(p)
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_stats)
