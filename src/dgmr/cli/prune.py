"""The ``prune`` and ``stats`` sub-commands (see :func:`dgmr.prune_to_dir`, :mod:`dgmr.prune.stream`).

Their flags come from the settings dataclasses (:class:`~dgmr.prune.settings.PruneSettings`,
:class:`~dgmr.prune.settings.StreamSettings`, :class:`~dgmr.prune.calibration.settings.CalibrationSettings`),
so each setting, its default and its help are declared once."""
from __future__ import annotations

import argparse
from typing import Any

from ..core.errors import DgmrError
from .args import add_model_args
from .settings import add_settings, given, given_flags


def _check_calibration(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration settings given; refuses those that cannot apply."""
    from ..prune.calibration.settings import CalibrationSettings
    from ..prune.criteria import criterion_scores

    settings = given(args, CalibrationSettings)
    if args.calibration is None:
        if settings:
            raise DgmrError(f"{given_flags(args, CalibrationSettings)[0]} applies to calibrated pruning only: "
                            "give --calibration DATA")
        if criterion_scores(args.criterion or "diversity") == "activations":
            raise DgmrError(f"--criterion {args.criterion} scores activations: give --calibration DATA "
                            "(a folder, a list file or shards of unlabeled images)")
    elif args.weights is not None:
        raise DgmrError("--calibration and --weights exclude each other: calibration runs the whole model over "
                        "images, streaming prune never holds it; prune in memory (without --weights) to calibrate")
    return settings


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    from ..prune.settings import PruneSettings
    from ..prune.to_dir import prune_to_dir

    settings = PruneSettings(**given(args, PruneSettings))
    if not settings.width_given and not settings.heads_given and settings.params_fraction is None:
        raise DgmrError("say how wide to keep the MLPs: --mlp-ratio R, --hidden N or --keep-fraction F (and/or how "
                        "many attention heads: --heads N or --head-fraction F), or how many parameters: "
                        "--params-fraction F")
    calibration_settings = _check_calibration(args)
    if args.weights is not None:
        from ..prune.stream import stream_prune

        return stream_prune(args.model, args.weights, args.out, settings, model_kwargs=args.model_kwargs,
                            max_memory=args.max_memory, shard_size=args.shard_size, progress=not args.json)
    if args.max_memory is not None or args.shard_size is not None:
        raise DgmrError("--max-memory and --shard-size apply to streaming prune only: give the checkpoint with --weights")
    return prune_to_dir(args.model, args.out, settings, model_kwargs=args.model_kwargs, progress=not args.json,
                        calibration=args.calibration, calibration_settings=calibration_settings)


def _stats(args: argparse.Namespace) -> dict[str, Any]:
    from ..prune.settings import WidthSettings
    from ..prune.stats import stats

    widths = WidthSettings(**given(args, WidthSettings))
    return stats(args.model, **widths.widths(), **widths.head_counts(), image_size=args.image_size,
                 model_kwargs=args.model_kwargs)


def register(sub: argparse._SubParsersAction) -> None:
    from ..prune.calibration.settings import GROUP, CalibrationSettings
    from ..prune.settings import PruneSettings, StreamSettings, WidthSettings

    p = sub.add_parser("prune", help="prune every MLP of a vision tower (weights-only; --calibration refits on images)",
                       description="Keep the most diverse hidden neurons of every MLP (greedy Gram-Schmidt on "
                                   "fc1), and with --heads the most diverse attention heads, and save the smaller "
                                   "model as a model repository of its library (model.safetensors beside the "
                                   "library's config files), with dgmr's record (dgmr.json) and a model card "
                                   "(README.md).")
    add_model_args(p)
    add_settings(p, PruneSettings)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_settings(p, StreamSettings)
    cal = p.add_argument_group(GROUP)
    cal.add_argument("--calibration", metavar="DATA", default=None,
                     help="unlabeled images (a folder, a .txt list, WebDataset shards) to calibrate the cut: refit "
                          "each cut MLP to the original's output, allow --criterion diversity-act and --allocate global")
    add_settings(p, CalibrationSettings, groups={GROUP: cal})
    p.set_defaults(func=_prune)

    p = sub.add_parser("stats", help="params and FLOPs before/after pruning (meta device: no weights, no download)")
    add_model_args(p)
    add_settings(p, WidthSettings)
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_stats)
