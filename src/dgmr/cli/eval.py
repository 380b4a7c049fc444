"""The ``eval`` (knn, linear, zeroshot, retrieval, speed) and ``report`` sub-commands."""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Callable

from ..dtypes import DTYPES
from ..errors import DgmrError
from .args import add_model_args, model_kwargs_arg, number_list


_int_list = number_list(int, "integers")
_float_list = number_list(float, "numbers")


def _common(p: argparse.ArgumentParser, *, model: bool = True, features: bool = True) -> None:
    if model:
        add_model_args(p)
    p.add_argument("--random-init", action="store_true", help="build the architecture with random weights (no download)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: the rank's GPU)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="compute dtype (autocast for features; weights for speed)")
    if features:
        p.add_argument("--batch-size", type=int, default=64, help="images per forward (per process)")
        p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
        p.add_argument("--cache-dir", default=None,
                       help="feature cache (default: $DGMR_CACHE/features or ~/.cache/dgmr/features)")
        p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
        p.add_argument("--label", default=None, help="model name in results and reports (default: MODEL)")
        p.add_argument("--crop-pct", type=float, default=None, metavar="FRACTION",
                       help="resize to size/FRACTION and center-crop (e.g. 0.875: 256 -> 224) in the model's "
                            "mean/std, instead of the model's own eval transform (the default)")
        p.add_argument("--dataset", default=None, metavar="NAME",
                       help="dataset name for the result file (clip_benchmark's 'dataset' field) and for "
                            "per-dataset class-name/template JSON files (default: the data folder's name)")
    p.add_argument("--save", default=None, metavar="FILE", help="also write the result JSON to FILE (for dgmr report)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _feature_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_size < 1:
        raise DgmrError("--batch-size must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        raise DgmrError("--image-size must be >= 1")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise DgmrError("--crop-pct must be in (0, 1]")
    return dict(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                dtype=args.dtype, cache_dir=False if args.no_cache else args.cache_dir, random_init=args.random_init,
                model_kwargs=args.model_kwargs, label=args.label, progress=not args.json, crop_pct=args.crop_pct,
                dataset=args.dataset)


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
        from ..paths import output_lock, refuse_overlap

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
    from ..evaluate.tasks import eval_knn

    return _finish(args, eval_knn(args.model, args.train, args.val, ks=args.k, temperature=args.temperature,
                                  **_feature_kwargs(args)))


def _linear(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.tasks import eval_linear

    if args.lr <= 0 or args.epochs < 1 or args.probe_batch_size < 1:
        raise DgmrError("--lr must be > 0, --epochs and --probe-batch-size >= 1")
    if not 0 <= args.held_out < 1 or (args.held_out == 0 and args.protocol == "lbfgs"):
        raise DgmrError("--held-out must be in (0, 1) (0 is allowed with --protocol clip_benchmark: no weight-decay search)")
    return _finish(args, eval_linear(args.model, args.train, args.val, weight_decays=args.weight_decays,
                                     val_fraction=args.held_out, max_iter=args.max_iter, seed=args.seed,
                                     protocol=args.protocol, lr=args.lr, epochs=args.epochs,
                                     probe_batch_size=args.probe_batch_size, **_feature_kwargs(args)))


def _zeroshot(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.tasks import eval_zeroshot

    return _finish(args, eval_zeroshot(args.model, args.data, classnames=args.classnames, templates=args.templates,
                                       text_model=args.text_model, **_feature_kwargs(args)))


def _retrieval(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..evaluate.tasks import eval_retrieval

    return _finish(args, eval_retrieval(args.model, args.captions, args.images, text_model=args.text_model,
                                        ks=args.k, ties=args.ties, **_feature_kwargs(args)))


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluate.tasks import eval_speed

    if args.batch_size < 1 or args.repeats < 1:
        raise DgmrError("--batch-size and --repeats must be >= 1")
    labels = args.label.split(",") if args.label else None
    return _finish(args, eval_speed(args.models, labels=labels, batch_size=args.batch_size, image_size=args.image_size,
                                    device=args.device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
                                    random_init=args.random_init, model_kwargs=args.model_kwargs))


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluate.report import render_report

    return render_report(args.inputs, args.out, baseline=args.baseline, overwrite=args.overwrite, title=args.title)


def _add(sub: argparse._SubParsersAction, name: str, func: Callable, help: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=_guarded(func))
    return p


def _register_clip(esub: argparse._SubParsersAction) -> None:
    """The zeroshot and retrieval sub-commands (CLIP models)."""
    from ..evaluate.retrieval import TIE_MODES

    p = _add(esub, "zeroshot", _zeroshot, "CLIP zero-shot classification (open_clip, HF CLIP/SigLIP)",
             "Zero-shot classification of --data (root/CLASS/IMAGE) with class text embeddings averaged over prompt "
             "templates (default: the 80 OpenAI ImageNet templates).")
    _common(p)
    p.add_argument("--data", required=True, help="evaluation split (root/CLASS/IMAGE)")
    p.add_argument("--classnames", default=None,
                   help="class names in sorted folder order: one per line (.txt), a JSON list or clip_benchmark's "
                        "per-dataset JSON (en_classnames.json; see --dataset); default: the bundled ImageNet-1K "
                        "names (only for 1000 class folders)")
    p.add_argument("--templates", default=None,
                   help="prompt templates with '{c}' or '{}' for the class name: one per line (.txt), a JSON list, "
                        "clip_benchmark's per-dataset JSON (see --dataset) or per-class prompts {class: [prompts]} "
                        "(default: the 80 OpenAI ImageNet ones)")
    p.add_argument("--text-model", default=None, metavar="MODEL",
                   help="take the text tower from this model (e.g. the original CLIP for a vision-only student)")

    p = _add(esub, "retrieval", _retrieval, "CLIP image<->text retrieval recall@K",
             "Image->text and text->image recall@K from a COCO/Flickr-style captions file (JSON or CSV/TSV of image "
             "path + one or more captions).")
    _common(p)
    p.add_argument("--captions", required=True, help="captions file (.json, .csv, .tsv)")
    p.add_argument("--images", required=True, help="directory the image paths are relative to")
    p.add_argument("--k", type=_int_list, default=[1, 5, 10], help="comma-separated K values (default 1,5,10)")
    p.add_argument("--ties", default="expected", choices=list(TIE_MODES),
                   help="scores tied with a right item: expected (default: recall expected under random "
                        "tie-breaking), optimistic (ties count as hits), pessimistic (ties count as misses)")
    p.add_argument("--text-model", default=None, metavar="MODEL", help="take the text tower from this model")


def register(sub: argparse._SubParsersAction) -> None:
    from ..evaluate.knn import DEFAULT_KS
    from ..evaluate.linear import DEFAULT_WEIGHT_DECAYS, PROTOCOLS as LINEAR_PROTOCOLS

    ev = sub.add_parser("eval", help="evaluate a model: knn, linear, zeroshot, retrieval, speed",
                        description="Standard evaluation protocols on frozen features; accuracies are fractions in "
                                    "[0, 1] under top1/top5. Runs alone (CPU/GPU) or under torchrun.")
    esub = ev.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)

    p = _add(esub, "knn", _knn, "weighted kNN on L2-normalised features (DINO protocol)",
             "kNN classification of --val against --train (ImageFolder layouts): cosine similarity, votes weighted "
             "exp(sim/T), images preprocessed with the model's own eval transform (--crop-pct 0.875: resize 256 / "
             "center-crop 224 scaled to the model's input size).")
    _common(p)
    p.add_argument("--train", required=True, help="training split (root/CLASS/IMAGE)")
    p.add_argument("--val", required=True, help="evaluation split (root/CLASS/IMAGE)")
    p.add_argument("--k", type=_int_list, default=list(DEFAULT_KS), help="comma-separated k values (default 10,20,100,200)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (default 0.07)")

    p = _add(esub, "linear", _linear, "linear probe (logistic regression) on frozen features",
             "A linear classifier on frozen pooled features; the weight decay is chosen on a held-out part of --train, "
             "then the classifier is refit and scored on --val. --protocol lbfgs (default): standardised features, "
             "full-batch L-BFGS over --weight-decays. --protocol clip_benchmark: clip_benchmark's recipe (L2-normalised "
             "features, AdamW with cosine schedule, its 97-point weight-decay search, refit on train + held-out).")
    _common(p)
    p.add_argument("--train", required=True, help="training split (root/CLASS/IMAGE)")
    p.add_argument("--val", required=True, help="evaluation split (root/CLASS/IMAGE)")
    p.add_argument("--weight-decays", type=_float_list, default=list(DEFAULT_WEIGHT_DECAYS),
                   help="comma-separated L2 penalties to try")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of --train held out to pick the penalty")
    p.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations per fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (and of the clip_benchmark probe)")
    p.add_argument("--protocol", default="lbfgs", choices=list(LINEAR_PROTOCOLS), help="probe recipe (default lbfgs)")
    p.add_argument("--lr", type=float, default=0.1, help="clip_benchmark protocol: AdamW learning rate (default 0.1)")
    p.add_argument("--epochs", type=int, default=10, help="clip_benchmark protocol: epochs (default 10)")
    p.add_argument("--probe-batch-size", type=int, default=64,
                   help="clip_benchmark protocol: probe training batch size (default 64)")

    _register_clip(esub)

    p = _add(esub, "speed", _speed, "params, FLOPs, throughput and peak memory (several models: speedup)",
             "Measure vision-tower params, FLOPs, throughput (warm-up, then median over repeats, models alternating) "
             "and peak memory. With two models (original first), also speedup and flops_ratio.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model specs or dgmr directories (original first)")
    p.add_argument("--model-kwargs", type=model_kwargs_arg, default=None, metavar="JSON",
                   help="extra architecture arguments for the specs")
    _common(p, model=False, features=False)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per model first")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per model")
    p.add_argument("--label", default=None, help="comma-separated names for the models")

    p = sub.add_parser("report", help="compare original / pruned / distilled models: Markdown, JSON, plots",
                       description="Build report.md (a table with params, FLOPs, throughput, every accuracy and deltas "
                                   "against the original), report.json and PNG plots (recovery curve from "
                                   "metrics.jsonl, accuracy vs FLOPs) from eval result files (--save), dgmr model "
                                   "directories and distillation run directories.")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_RESULT", help="result JSON files, model dirs or run dirs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--baseline", default=None, help="model the deltas are against (default: the first original)")
    p.add_argument("--title", default="dgmr report", help="report title")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_report)
