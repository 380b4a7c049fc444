"""Evaluations of a model on folders of images: thin wrappers that open the model, extract
(cached) features and call the tensor-level protocols in :mod:`.knn`, :mod:`.linear`,
:mod:`.zeroshot` and :mod:`.retrieval`. Every function returns a JSON-able dict with the
model's label, role (original / pruned / distilled), params, FLOPs and the metric.

Each takes its settings as dataclasses of :mod:`.settings` (``features=FeatureSettings(...)``
and the protocol's own, e.g. ``knn=KnnSettings(...)``) or as keywords named like their
fields (the CLI's flags), which override the objects' values.

Under ``torchrun`` the process group is started from the environment (NCCL on GPUs, gloo
on CPU), every rank extracts its share, and only rank 0 returns a result (others: None).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core import dist as D
from ..core.dtypes import parse_dtype
from ..core.errors import DgmrError
from ..data.labeled import ImageFolderSplit, ImageListDataset, read_captions, read_named_lists
from ..io.output import output_lock, refuse_overlap, write_json
from ..models.artifact import read_config, saved_preprocess
from ..models.cost import count_flops
from ..models.families import Family, family_of
from ..models.open import model_path, open_model_with_config
from ..models.preprocess import EvalPreprocess, resolve_eval_preprocess
from ..models.sources import Source, is_dgmr_dir
from .features import FeatureCache, default_cache_dir, extract_features, pooled_features, weights_hash
from .knn import knn_classify
from .linear import linear_probe
from .linear_cb import clip_benchmark_probe
from .results import dataset_name, with_clip_benchmark_fields
from .retrieval import retrieval_recall
from .settings import (
    FeatureSettings,
    KnnSettings,
    LinearSettings,
    ModelSettings,
    RetrievalSettings,
    SpeedSettings,
    ZeroshotSettings,
    resolve,
)
from .speed import check_image_size, measure_speed
from .zeroshot import (
    ClipTowers,
    clip_image_encoder,
    clip_towers,
    encode_texts,
    imagenet_classnames,
    imagenet_templates,
    text_classifier,
    zeroshot_classify,
)


def model_role(model: str | os.PathLike | nn.Module) -> str:
    """original (a spec, or a dgmr dir without a prune record), pruned, or distilled
    (a dgmr dir with distillation settings recorded or a metrics.jsonl beside it)."""
    if isinstance(model, nn.Module) or not is_dgmr_dir(model):
        return "original"
    cfg = read_config(model)
    p = Path(model)
    if any("distill" in k for k in cfg) or (p / "metrics.jsonl").is_file() or (p.parent / "metrics.jsonl").is_file():
        return "distilled"
    shrunk = (cfg.get("params_after") or 0) < (cfg.get("params_before") or 0)
    return "pruned" if cfg.get("prune") or shrunk else "original"


def open_eval_model(model: str | os.PathLike | nn.Module, settings: ModelSettings | None = None, *,
                    label: str | None = None) -> tuple[nn.Module, Source | None, dict[str, Any]]:
    """(model in eval mode, its source, {"model": label, "role", "family"[, "random_init_seed"]});
    ``settings``: its ``random_init``, ``seed`` and ``model_kwargs`` open a spec."""
    net, src, info, _ = _open_eval_model(model, settings, label=label)
    return net, src, info


def _open_eval_model(model: Any, settings: ModelSettings | None, *, label: str | None = None
                     ) -> tuple[nn.Module, Source | None, dict[str, Any], dict[str, Any] | None]:
    """:func:`open_eval_model` and the dgmr record of a directory (None for specs and modules)."""
    cfg, seed = None, None
    if isinstance(model, nn.Module):
        net, src = model.eval(), None
        name = label or type(model).__name__
    else:
        s = settings or ModelSettings()
        with torch.random.fork_rng(devices=[]):  # --random-init weights come from --seed: the same command, the same model
            torch.manual_seed(s.seed)
            net, src, cfg = open_model_with_config(model, random_init=s.random_init, model_kwargs=s.model_kwargs)
        name = label or str(model)
        seed = s.seed if s.random_init else None
    info = {"model": name, "role": model_role(model), "family": family_of(net).name}
    return net, src, info if seed is None else {**info, "random_init_seed": seed}, cfg


def eval_preprocess_of(model: Any, net: nn.Module, family: Family, src: Source | None, cfg: dict[str, Any] | None,
                       s: FeatureSettings) -> EvalPreprocess:
    """A dgmr directory's saved preprocessing, else the model's own from its source; a directory
    that saved none is not preprocessed from files at its source's path (they may have moved
    or changed): the library's defaults for the architecture, with a warning."""
    saved = saved_preprocess(model, cfg) if cfg is not None else None
    if cfg is not None and saved is None and src is not None and model_path(src.spec) is not None:
        src = None
    return resolve_eval_preprocess(net, family, source=src, crop=s.crop_pct, image_size=s.image_size, saved=saved)


def _same_weights_on_all_ranks(net: nn.Module) -> None:
    """Random-init weights differ per process: under torchrun, take rank 0's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = D.collective_device()
        with torch.no_grad():
            for t in list(net.parameters()) + list(net.buffers()):
                buf = t.detach().to(dev).contiguous()
                dist.broadcast(buf, src=0)
                t.copy_(buf.to(t.device))


def _model_numbers(net: nn.Module, family: Family, image_size: int) -> dict[str, Any]:
    return {"params": family.vision_params(net), "flops": count_flops(net, family, image_size), "image_size": image_size}


def _cache(s: FeatureSettings) -> FeatureCache:
    root = s.cache_root
    if root is False:
        return FeatureCache(None)
    return FeatureCache(default_cache_dir() if root is None else root)


def _prepare(model: Any, s: FeatureSettings, device: torch.device
             ) -> tuple[nn.Module, Source | None, Family, dict[str, Any], EvalPreprocess]:
    """Open the model and resolve its eval preprocessing (the model's own, or the classic
    resize + center crop when ``s.crop_pct`` is given)."""
    net, src, info, cfg = _open_eval_model(model, s, label=s.label)
    family = family_of(net)
    native = family.data_config(net)["image_size"]
    size = int(s.image_size or native)
    net.to(device)
    if s.random_init:
        _same_weights_on_all_ranks(net)
    if size != native:
        check_image_size(net, family, size, label=info["model"])
    pre = eval_preprocess_of(model, net, family, src, cfg, s)
    info.update(_model_numbers(net, family, size))
    info["preprocess"] = pre.settings
    info["pretrained"] = (src.tag if src is not None and src.tag else "") or ("random-init" if s.random_init else "")
    return net, src, family, info, pre


def _split_features(fn, ds, key: dict[str, str], cache: FeatureCache, s: FeatureSettings, device: torch.device,
                    dtype: torch.dtype, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    key = {**key, "data": ds.listing_digest(), "n": str(len(ds))}
    return cache.features(key, lambda: extract_features(fn, ds, batch_size=s.batch_size, num_workers=s.workers,
                                                        device=device, dtype=dtype, progress=s.progress, desc=desc))


def _feature_key(net: nn.Module, family: Family, pre: EvalPreprocess, kind: str, dtype: torch.dtype) -> dict[str, str]:
    return {"weights": weights_hash(net), "family": family.name, "kind": kind, "dtype": str(dtype),
            "transform": pre.describe(), "stored": "float32"}


def _classification_features(model: Any, train: str | os.PathLike, val: str | os.PathLike, s: FeatureSettings,
                             kind: str = "pooled") -> tuple[dict[str, Any], Any, int] | None:
    """Features of both splits (through the cache): the pooled/CLS feature, or with
    ``kind="clip_image"`` a CLIP model's image embedding (pooled for other models)."""
    with D.session(s.device) as dinfo:
        dev, dt, rank, world = dinfo.device, parse_dtype(s.dtype), dinfo.rank, dinfo.world
        net, _, family, info, pre = _prepare(model, s, dev)
        tr = ImageFolderSplit(train, pre.transform)
        va = ImageFolderSplit(val, pre.transform, classes=tr.classes)
        cache = _cache(s)
        fn = clip_image_encoder(net) if kind == "clip_image" else None
        kind = "clip_image" if fn is not None else "pooled"
        fn = fn or pooled_features(net, family)
        key = _feature_key(net, family, pre, kind, dt)
        t0 = time.perf_counter()
        ftr, ytr = _split_features(fn, tr, key, cache, s, dev, dt, "train features")
        fva, yva = _split_features(fn, va, key, cache, s, dev, dt, "val features")
        if rank != 0:
            return None
        skipped = tr.skipped + va.skipped  # named like images, not regular files: counted, never opened
        if skipped:
            info.update(skipped_files=len(skipped), skipped_examples=skipped[:5])
        info.update({"train": str(train), "val": str(val), "world_size": world, "device": str(dev),
                     "features": kind, "feature_dim": int(ftr.shape[1]), "feature_seconds": round(time.perf_counter() - t0, 3),
                     "cache": {"hits": cache.hits, "misses": cache.misses,
                               "dir": str(cache.root) if cache.root else None}})
        return info, (ftr, ytr, fva, yva, dev), len(tr.classes)


def eval_knn(model: Any, train: str | os.PathLike, val: str | os.PathLike, *, knn: KnnSettings | None = None,
             features: FeatureSettings | None = None, **settings: Any) -> dict[str, Any] | None:
    """``dgmr eval knn``: weighted kNN (cosine, exp(sim/T)) of ``val`` against ``train``
    (ImageFolder layouts), on the model's pooled/CLS features. ``settings``: any field of
    :class:`~.settings.KnnSettings` (``k``, alias ``ks``; ``temperature``) or
    :class:`~.settings.FeatureSettings` (e.g. ``crop_pct``: resize size/crop_pct + center crop
    instead of the model's own eval transform), overriding ``knn``'s and ``features``' values."""
    knn, features = resolve("eval_knn", settings, (KnnSettings, knn), (FeatureSettings, features))
    got = _classification_features(model, train, val, features)
    if got is None:
        return None
    info, (ftr, ytr, fva, yva, dev), c = got
    res = knn_classify(ftr, ytr, fva, yva, ks=knn.k, temperature=knn.temperature, num_classes=c, device=dev)
    return with_clip_benchmark_fields({**info, **res}, dataset=features.dataset)


def eval_linear(model: Any, train: str | os.PathLike, val: str | os.PathLike, *, linear: LinearSettings | None = None,
                features: FeatureSettings | None = None, **settings: Any) -> dict[str, Any] | None:
    """``dgmr eval linear``: a linear classifier on frozen pooled features, scored on ``val``.
    ``protocol="lbfgs"``: logistic regression, the L2 penalty picked among ``weight_decays``
    on a ``held_out`` fraction (alias ``val_fraction``) of ``train``; ``"clip_benchmark"``:
    clip_benchmark's recipe (AdamW ``lr``, ``epochs``, batches of ``probe_batch_size``, its
    weight-decay search) on a CLIP model's image embeddings (``encode_image``, as
    clip_benchmark), other models' pooled features. ``settings``: any field of
    :class:`~.settings.LinearSettings` or :class:`~.settings.FeatureSettings`."""
    lin, features = resolve("eval_linear", settings, (LinearSettings, linear), (FeatureSettings, features))
    got = _classification_features(model, train, val, features,
                                   kind="clip_image" if lin.protocol == "clip_benchmark" else "pooled")
    if got is None:
        return None
    info, (ftr, ytr, fva, yva, dev), c = got
    if lin.protocol == "clip_benchmark":
        res = clip_benchmark_probe(ftr, ytr, fva, yva, val_fraction=lin.held_out, seed=lin.seed, lr=lin.lr,
                                   epochs=lin.epochs, batch_size=lin.probe_batch_size, num_classes=c, device=dev)
    else:
        res = linear_probe(ftr, ytr, fva, yva, weight_decays=lin.weight_decays, val_fraction=lin.held_out,
                           seed=lin.seed, max_iter=lin.max_iter, num_classes=c, device=dev)
    return with_clip_benchmark_fields({**info, **res}, dataset=features.dataset)


def _clip_setup(model: Any, text_model: Any, s: FeatureSettings, dev: torch.device):
    net, src, family, info, pre = _prepare(model, s, dev)
    model_dir = model if not isinstance(model, nn.Module) and is_dgmr_dir(model) else None
    if text_model is None:
        towers = clip_towers(net, src, model_dir=model_dir)
    else:
        tnet, tsrc, tinfo = open_eval_model(text_model, s)
        tnet.to(dev)
        tdir = text_model if not isinstance(text_model, nn.Module) and is_dgmr_dir(text_model) else None
        image_towers = clip_towers(net, src, model_dir=model_dir)
        text_towers = clip_towers(tnet, tsrc, model_dir=tdir)
        towers = ClipTowers(image_towers.kind, net, image_towers.encode_image, text_towers.encode_text)
        info["text_model"] = tinfo["model"]
    return net, family, info, pre, towers


def _classnames(classnames: Any, classes: list[str], data: Any, dataset: str) -> list[str]:
    """The class names of ``classes`` (sorted folders), checked against their number."""
    if classnames is None or classnames == "imagenet":
        if len(classes) != 1000:
            raise DgmrError(f"{data} has {len(classes)} class folders: give --classnames FILE (one name per line, in "
                            "the sorted order of the folders); the bundled ImageNet names fit only 1000 classes")
        names = imagenet_classnames()
    elif isinstance(classnames, (str, os.PathLike)):
        names = read_named_lists(classnames, "class names", dataset)
    else:
        names = [str(c) for c in classnames]
    if len(names) != len(classes):
        raise DgmrError(f"{len(names)} class names for {len(classes)} class folders in {data}")
    return names


def _templates(templates: Any, dataset: str) -> list[str] | dict[str, list[str]]:
    if templates is None or templates in ("openai", "imagenet"):
        return imagenet_templates()
    if isinstance(templates, (str, os.PathLike)):
        return read_named_lists(templates, "templates", dataset)
    if isinstance(templates, dict):
        return {str(k): [str(t) for t in v] for k, v in templates.items()}
    return [str(t) for t in templates]


@dataclass
class _ClipImages:
    """CLIP image embeddings of an eval split, with what the result reports about them."""

    feats: torch.Tensor
    labels: torch.Tensor
    towers: ClipTowers
    info: dict[str, Any]
    cache: FeatureCache
    dinfo: D.DistInfo
    dtype: torch.dtype
    t0: float

    def autocast(self) -> Any:
        return torch.autocast(self.dinfo.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def result(self, res: dict[str, Any], dataset: str | None = None, **fields: Any) -> dict[str, Any]:
        self.info.update({**fields, "world_size": self.dinfo.world, "device": str(self.dinfo.device),
                          "seconds": round(time.perf_counter() - self.t0, 3),
                          "cache": {"hits": self.cache.hits, "misses": self.cache.misses}})
        return with_clip_benchmark_fields({**self.info, **res}, dataset=dataset)


def _clip_images(model: Any, text_model: Any, dataset: Callable[[Any], Dataset], dinfo: D.DistInfo,
                 s: FeatureSettings) -> _ClipImages:
    """Open the CLIP model (text tower from ``text_model`` if given) and embed every image of
    ``dataset(eval transform)`` (through the feature cache): zero-shot's and retrieval's first half."""
    dt = parse_dtype(s.dtype)
    net, family, info, pre, towers = _clip_setup(model, text_model, s, dinfo.device)
    ds = dataset(pre.transform)
    cache = _cache(s)
    t0 = time.perf_counter()
    feats, labels = _split_features(towers.encode_image, ds, _feature_key(net, family, pre, "clip_image", dt), cache,
                                    s, dinfo.device, dt, "image embeddings")
    return _ClipImages(feats, labels, towers, info, cache, dinfo, dt, t0)


def eval_zeroshot(model: Any, data: str | os.PathLike, *, zeroshot: ZeroshotSettings | None = None,
                  features: FeatureSettings | None = None, **settings: Any) -> dict[str, Any] | None:
    """``dgmr eval zeroshot``: CLIP zero-shot classification of an ImageFolder ``data``
    split with class embeddings averaged over prompt ``templates`` (default: the 80 OpenAI
    ImageNet templates; ``{c}`` or ``{}`` marks the class name). ``classnames``: a file, a
    list, or None for the bundled ImageNet names (1000 folders); a JSON file may map dataset
    names to lists (clip_benchmark's layout): ``dataset`` (default: the folder's name) picks
    the entry. ``text_model``: take the text tower from this model instead. ``settings``: any
    field of :class:`~.settings.ZeroshotSettings` or :class:`~.settings.FeatureSettings`."""
    zs, features = resolve("eval_zeroshot", settings, (ZeroshotSettings, zeroshot), (FeatureSettings, features))
    name = features.dataset or dataset_name(str(data))
    tpl = _templates(zs.templates, name)
    if isinstance(zs.classnames, (str, os.PathLike)) and zs.classnames != "imagenet":
        read_named_lists(zs.classnames, "class names", name)  # fail before opening the model
    names: list[str] = []

    def make_dataset(transform: Any) -> Dataset:
        ds = ImageFolderSplit(data, transform)
        names.extend(_classnames(zs.classnames, ds.classes, data, name))  # before the images are embedded
        return ds

    with D.session(features.device) as dinfo:
        emb = _clip_images(model, zs.text_model, make_dataset, dinfo, features)
        if dinfo.rank != 0:
            return None
        with emb.autocast():
            clf = text_classifier(emb.towers.encode_text, names, tpl, zs.text_batch_size)
        n_tpl = len(tpl) if not isinstance(tpl, dict) else sum(len(v) for v in tpl.values())  # per-class: all prompts
        return emb.result(zeroshot_classify(emb.feats, emb.labels, clf), dataset=name, data=str(data),
                          templates=n_tpl)


def eval_retrieval(model: Any, captions: str | os.PathLike, images: str | os.PathLike, *,
                   retrieval: RetrievalSettings | None = None, features: FeatureSettings | None = None,
                   **settings: Any) -> dict[str, Any] | None:
    """``dgmr eval retrieval``: image->text and text->image recall@K over a captions file
    (see :func:`~dgmr.data.labeled.read_captions`) and its images; ``ties``: see
    :mod:`~dgmr.evaluate.retrieval`. ``settings``: any field of
    :class:`~.settings.RetrievalSettings` (``k``, alias ``ks``; ``ties``; ``text_model``) or
    :class:`~.settings.FeatureSettings`; K and the tie rule are checked before the model is opened."""
    rt, features = resolve("eval_retrieval", settings, (RetrievalSettings, retrieval), (FeatureSettings, features))
    caps = read_captions(captions, images)
    with D.session(features.device) as dinfo:
        emb = _clip_images(model, rt.text_model, lambda transform: ImageListDataset(caps.images, transform), dinfo,
                           features)
        if dinfo.rank != 0:
            return None
        with emb.autocast():
            txt = encode_texts(emb.towers.encode_text, caps.captions, rt.text_batch_size)
        img = torch.nn.functional.normalize(emb.feats.float(), dim=-1)
        if img.shape[1] != txt.shape[1]:
            raise DgmrError(f"image embeddings have {img.shape[1]} dims, text embeddings {txt.shape[1]}")
        return emb.result(retrieval_recall(img @ txt.T, caps.caption_image, rt.k, ties=rt.ties),
                          dataset=features.dataset, captions=str(captions), images=str(images))


def eval_speed(models: Sequence[Any], *, speed: SpeedSettings | None = None, **settings: Any) -> dict[str, Any]:
    """``dgmr eval speed``: params, FLOPs, throughput and peak memory of one or more models in
    one run; with two or more, ``speedup`` and ``flops_ratio`` compare the last with the first.
    ``settings``: any field of :class:`~.settings.SpeedSettings` (``label``, alias ``labels``:
    the models' names, as a list or comma-separated text), overriding ``speed``'s values."""
    (s,) = resolve("eval_speed", settings, (SpeedSettings, speed))
    if not models:
        raise DgmrError("give at least one model")
    labels = s.label
    if labels is not None and len(labels) != len(models):
        raise DgmrError(f"{len(labels)} labels for {len(models)} models")
    nets, infos = {}, {}
    for i, m in enumerate(models):
        net, _, info = open_eval_model(m, s, label=labels[i] if labels else None)
        name = info["model"]
        if name in nets:
            name = f"{name} #{i}"
            info["model"] = name
        nets[name], infos[name] = net, info
    res = measure_speed(nets, batch_size=s.batch_size, image_size=s.image_size, device=D.pick_device(s.device),
                        dtype=parse_dtype(s.dtype), warmup=s.warmup, repeats=s.repeats)
    for name, row in res["models"].items():
        row.update({k: v for k, v in infos[name].items() if k != "model"})
    return with_clip_benchmark_fields(res, pretrained="random-init" if s.random_init else "")


def save_result(result: dict[str, Any], path: str | os.PathLike,
                inputs: Sequence[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """Write a result dict as JSON (with clip_benchmark's fields, see :mod:`.results`),
    atomically (temp file + rename), under ``path``'s lock;
    refused when ``path`` overlaps one of ``inputs`` ((label, path) pairs: the data read)."""
    p = Path(path)
    if p.is_dir():
        raise DgmrError(f"{p} is a directory; --save takes a file name")
    refuse_overlap(p, inputs, "result file")
    if result.get("metric") and not isinstance(result.get("metrics"), dict):  # a dict made by older code
        result = with_clip_benchmark_fields(result)
    with output_lock(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json(p, result)
