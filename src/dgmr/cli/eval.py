"""The ``eval`` (knn, linear, zeroshot, retrieval, speed) and ``report`` sub-commands.

Their setting flags are generated from the fields of the dataclasses in
:mod:`dgmr.evaluate.settings` (names, types, choices, help, defaults), which are also the
keywords of the ``eval_*`` functions, so a setting and its default are declared once. Every
setting flag defaults to None: a flag not given leaves the dataclass's default in place. The
data inputs (--train, --val, --data, --captions, --images) are required arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Callable

from .args import add_model_args
from .settings import add_settings, given


def _inputs(p: argparse.ArgumentParser, **inputs: str) -> None:
    """The required data flags (inputs, not settings): ``train="help"`` -> ``--train``."""
    for name, help_ in inputs.items():
        p.add_argument(f"--{name}", required=True, help=help_)  # "(required)" is added for every required flag


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save", default=None, metavar="FILE", help="also write the result JSON to FILE (for dgmr report)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (and no progress bars)")


def _features(args: argparse.Namespace) -> Any:
    """The FeatureSettings the flags give (progress bars unless --json); checked here, before
    the model is opened."""
    from ..evaluate.settings import FeatureSettings

    return FeatureSettings(**given(args, FeatureSettings), progress=not args.json)


# the protocols' data flags: --save must not overlap them (a model or run directory may hold
# results: dgmr report reads RUN/eval/*.json)
_DATA_FLAGS = ("train", "val", "data", "images", "captions", "classnames", "templates")


def _save_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(f"--{k}", v) for k in _DATA_FLAGS if isinstance(v := getattr(args, k, None), str) and os.path.exists(v)]


def _guarded(func: Callable) -> Callable:
    """Check --save against the inputs and hold its lock for the whole command (rank 0 only
    under torchrun: the other ranks write nothing), before any feature is computed."""
    def run(args: argparse.Namespace) -> dict[str, Any] | None:
        if not args.save:
            return func(args)
        from ..io.output import output_lock, refuse_overlap

        refuse_overlap(args.save, _save_inputs(args), "result file")
        with output_lock(args.save) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
            return func(args)
    return run


def _finish(args: argparse.Namespace, result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is not None and args.save:
        from ..evaluate.tasks import save_result

        save_result(result, args.save, _save_inputs(args))
    return result


def _knn(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.settings import KnnSettings
    from ..evaluate.tasks import eval_knn

    knn = KnnSettings(**given(args, KnnSettings))
    return _finish(args, eval_knn(args.model, args.train, args.val, knn=knn, features=_features(args)))


def _linear(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.settings import LinearSettings
    from ..evaluate.tasks import eval_linear

    linear = LinearSettings(**given(args, LinearSettings))
    return _finish(args, eval_linear(args.model, args.train, args.val, linear=linear, features=_features(args)))


def _zeroshot(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.settings import ZeroshotSettings
    from ..evaluate.tasks import eval_zeroshot

    zeroshot = ZeroshotSettings(**given(args, ZeroshotSettings))
    return _finish(args, eval_zeroshot(args.model, args.data, zeroshot=zeroshot, features=_features(args)))


def _retrieval(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.settings import RetrievalSettings
    from ..evaluate.tasks import eval_retrieval

    retrieval = RetrievalSettings(**given(args, RetrievalSettings))
    return _finish(args, eval_retrieval(args.model, args.captions, args.images, retrieval=retrieval,
                                        features=_features(args)))


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluate.settings import SpeedSettings
    from ..evaluate.tasks import eval_speed

    return _finish(args, eval_speed(args.models, speed=SpeedSettings(**given(args, SpeedSettings))))


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from ..report import render_report

    return render_report(args.inputs, args.out, baseline=args.baseline, overwrite=args.overwrite, title=args.title)


def _add(sub: argparse._SubParsersAction, name: str, func: Callable, help: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=_guarded(func))
    return p


def _protocol(esub: argparse._SubParsersAction, name: str, func: Callable, help: str, description: str,
              settings: type, **inputs: str) -> argparse.ArgumentParser:
    """A feature-extracting protocol's sub-command: MODEL, the feature settings, the output
    flags, the required ``inputs`` and the protocol's own ``settings``."""
    from ..evaluate.settings import FeatureSettings

    p = _add(esub, name, func, help, description)
    add_model_args(p, kwargs=False)  # --model-kwargs is a FeatureSettings field
    add_settings(p, FeatureSettings)
    _output(p)
    _inputs(p, **inputs)
    add_settings(p, settings)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    from ..evaluate.settings import KnnSettings, LinearSettings, RetrievalSettings, SpeedSettings, ZeroshotSettings

    ev = sub.add_parser("eval", help="evaluate a model: knn, linear, zeroshot, retrieval, speed",
                        description="Standard evaluation protocols on frozen features; accuracies are fractions in "
                                    "[0, 1] under top1/top5. Runs alone (CPU/GPU) or under torchrun.")
    esub = ev.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    split = "split (root/CLASS/IMAGE)"
    _protocol(esub, "knn", _knn, "weighted kNN on L2-normalised features (DINO protocol)",
              "kNN classification of --val against --train (ImageFolder layouts): cosine similarity, votes weighted "
              "exp(sim/T), images preprocessed with the model's own eval transform (--crop-pct 0.875: resize 256 / "
              "center-crop 224 scaled to the model's input size).",
              KnnSettings, train=f"training {split}", val=f"evaluation {split}")
    _protocol(esub, "linear", _linear, "linear probe (logistic regression) on frozen features",
              "A linear classifier on frozen pooled features; the weight decay is chosen on a held-out part of "
              "--train, then the classifier is refit and scored on --val. --protocol lbfgs (default): standardised "
              "features, full-batch L-BFGS over --weight-decays. --protocol clip_benchmark: clip_benchmark's recipe "
              "(L2-normalised features, AdamW with cosine schedule, its 97-point weight-decay search, refit on train "
              "+ held-out).",
              LinearSettings, train=f"training {split}", val=f"evaluation {split}")
    _protocol(esub, "zeroshot", _zeroshot, "CLIP zero-shot classification (open_clip, HF CLIP/SigLIP)",
              "Zero-shot classification of --data (root/CLASS/IMAGE) with class text embeddings averaged over prompt "
              "templates (default: the 80 OpenAI ImageNet templates).",
              ZeroshotSettings, data=f"evaluation {split}")
    _protocol(esub, "retrieval", _retrieval, "CLIP image<->text retrieval recall@K",
              "Image->text and text->image recall@K from a COCO/Flickr-style captions file (JSON or CSV/TSV of image "
              "path + one or more captions).",
              RetrievalSettings, captions="captions file (.json, .csv, .tsv)",
              images="directory the image paths are relative to")

    p = _add(esub, "speed", _speed, "params, FLOPs, throughput and peak memory (several models: speedup)",
             "Measure vision-tower params, FLOPs, throughput (warm-up, then median over repeats, models alternating) "
             "and peak memory. With two models (original first), also speedup and flops_ratio.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model specs or dgmr directories (original first)")
    add_settings(p, SpeedSettings)
    _output(p)

    p = sub.add_parser("report", help="compare original / pruned / distilled models: Markdown, JSON, plots",
                       description="Build report.md (a table with params, FLOPs, throughput, every accuracy and deltas "
                                   "against the original), report.json and PNG plots (recovery curve from "
                                   "metrics.jsonl, accuracy vs FLOPs) from eval result files (--save), dgmr model "
                                   "directories and distillation run directories.")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_RESULT", help="result JSON files, model dirs or run dirs")
    p.add_argument("--out", required=True, help="output directory (required)")
    p.add_argument("--baseline", default=None, help="model the deltas are against (default: the first original)")
    p.add_argument("--title", default="dgmr report", help="report title (default: dgmr report)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_report)
