"""Model sources, parsed in one place.

A model spec is ``timm:NAME``, ``open_clip:ARCH[:PRETRAINED_TAG]``, ``hf:REPO_ID_OR_DIR``,
or a directory written by dgmr. :class:`Source` records everything needed to rebuild the
architecture later without a network: timm kwargs, the open_clip model config, the
Hugging Face config.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import DgmrError, first_line
from ..io.files import read_json_file
from ..io.schema import LIBRARIES


@dataclass
class Source:
    library: str
    name: str
    tag: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # what rebuilds the architecture offline: open_clip model_cfg, HF config dict + class name
    model_cfg: dict[str, Any] | None = None
    hf_class: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.library}:{self.name}" + (f":{self.tag}" if self.tag else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Source":
        return cls(**{k: d.get(k) for k in ("library", "name", "tag", "model_cfg", "hf_class")}, kwargs=d.get("kwargs") or {})


RECORD = "dgmr.json"  # dgmr's record in a dgmr directory
LEGACY_RECORD = "config.json"  # where dgmr kept it before the directory became the library's model repo


def dgmr_record_file(path: str | os.PathLike) -> Path | None:
    """The file holding dgmr's record in ``path`` (dgmr.json, or an old layout's config.json),
    or None when ``path`` is not a dgmr directory."""
    p = Path(path)
    return next((p / name for name in (RECORD, LEGACY_RECORD) if is_record_file(p / name)), None)


def is_record_file(file: Path) -> bool:
    """Whether ``file`` is a JSON file holding dgmr's record (its ``format`` is ``dgmr``)."""
    if not file.is_file():
        return False
    try:
        cfg = read_json_file(file, "config")
    except DgmrError:  # unreadable, too large, not JSON: not a dgmr record
        return False
    return isinstance(cfg, dict) and cfg.get("format") == "dgmr"


def is_dgmr_dir(path: str | os.PathLike) -> bool:
    return dgmr_record_file(path) is not None


def library_layout(path: str | os.PathLike) -> str | None:
    """The spec that opens ``path`` when it is a model folder of a library rather than a dgmr
    directory (``timm:local-dir:DIR``, ``open_clip:local-dir:DIR``, ``hf:DIR``), else None."""
    p = Path(path)
    if (p / "open_clip_config.json").is_file():
        return f"open_clip:local-dir:{p}"
    try:
        cfg = read_json_file(p / "config.json", "config") if (p / "config.json").is_file() else None
    except DgmrError:
        return None
    if isinstance(cfg, dict) and "architecture" in cfg and "model_type" not in cfg:
        return f"timm:local-dir:{p}"
    if isinstance(cfg, dict) and "model_type" in cfg:
        return f"hf:{p}"
    return None


def parse_spec(spec: str, kwargs: dict[str, Any] | None = None) -> Source:
    """Parse ``timm:NAME``, ``open_clip:ARCH[:TAG]`` or ``hf:ID_OR_DIR`` (dgmr dirs: see :func:`dgmr.load`)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DgmrError(f"unknown model spec {spec!r}: use timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR or a directory dgmr wrote")
    library, _, rest = spec.partition(":")
    library = library.lower().replace("-", "_")
    if library in ("openclip",):
        library = "open_clip"
    if library not in LIBRARIES or not rest:
        raise DgmrError(f"unknown model spec {spec!r}: use timm:NAME, open_clip:ARCH[:TAG], hf:REPO_OR_DIR or a directory dgmr wrote")
    tag = None
    if library == "open_clip" and ":" in rest and not rest.startswith(("hf-hub:", "local-dir:")):
        rest, _, tag = rest.partition(":")
    return Source(library, rest, tag or None, dict(kwargs or {}))


@contextlib.contextmanager
def _device_ctx(where: str):
    """``meta``: every tensor on meta; ``empty``: parameters on meta, buffers real; else as is."""
    if where == "meta":
        with torch.device("meta"):
            yield
    elif where == "empty":
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            yield
    else:
        yield


HUB_SCHEMES = ("local-dir:", "hf-hub:")  # timm's and open_clip's names of a model repository


def _timm_hub_config(name: str) -> dict[str, Any]:
    """A timm model repository's config.json (``local-dir:DIR``; ``hf-hub:ID`` through timm,
    which downloads it), as {"architecture", "model_args", "pretrained_cfg"}."""
    import timm.models

    if name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:")) / "config.json"
        if not path.is_file():
            raise DgmrError(f"timm:{name}: no {path} (a timm model folder holds config.json and its weights)")
        cfg = read_json_file(path, "timm config")
        if not isinstance(cfg, dict) or "architecture" not in cfg:
            raise DgmrError(f"{path} is not a timm config.json (no 'architecture'; timm writes one with "
                            "timm.models.push_to_hf_hub / save_for_hf)")
        return {"architecture": cfg["architecture"], "model_args": cfg.get("model_args") or {},
                "pretrained_cfg": {k: v for k, v in (cfg.get("pretrained_cfg") or {}).items()
                                   if k not in ("file", "url", "hf_hub_id", "hf_hub_filename", "source")}}
    pcfg, arch, args = timm.models.load_model_config_from_hf(name.removeprefix("hf-hub:"))
    return {"architecture": arch, "model_args": dict(args or {}),
            "pretrained_cfg": {k: v for k, v in dict(pcfg).items() if k not in ("file", "hf_hub_id", "source")}}


def _build_timm(src: Source, pretrained: bool, where: str) -> nn.Module:
    import timm

    if src.name.startswith(HUB_SCHEMES):
        if src.model_cfg is None:
            src.model_cfg = _timm_hub_config(src.name)
        if pretrained:  # timm reads the folder (or hub repo) itself: its config and its weights
            return timm.create_model(src.name, pretrained=True, **src.kwargs)
        # the architecture from the recorded config: rebuilt without the folder
        cfg = src.model_cfg
        return timm.create_model(cfg["architecture"], pretrained=False, pretrained_cfg=dict(cfg["pretrained_cfg"]),
                                 **{**cfg["model_args"], **src.kwargs})
    if not timm.is_model(src.name):
        raise DgmrError(f"unknown timm model {src.name!r} (see timm.list_models(); a timm model folder is "
                        "timm:local-dir:DIR)")
    return timm.create_model(src.name, pretrained=pretrained, **src.kwargs)


def register_open_clip_config(name: str, cfg: dict[str, Any]) -> None:
    import open_clip

    if open_clip.get_model_config(name) is not None:
        return
    # open_clip registers configs from files only; it parses the file into memory at once, so
    # the file can go right after (each call used to leave a /tmp/dgmr-open_clip-* directory)
    with tempfile.TemporaryDirectory(prefix="dgmr-open_clip-") as d:
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        with contextlib.suppress(AttributeError, ValueError):  # nor keep rescanning a deleted path
            open_clip.factory._MODEL_CONFIG_PATHS.remove(path)


@contextlib.contextmanager
def _no_warnings():
    before = logging.root.manager.disable
    logging.disable(max(before, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(before)


def _check_open_clip_tag(src: Source) -> None:
    """A pretrained tag open_clip knows for the architecture, or a checkpoint file: a made-up tag
    is refused even with --random-init (it would be recorded as the model's origin)."""
    import open_clip

    if open_clip.get_pretrained_cfg(src.name, src.tag) or os.path.isfile(src.tag):
        return
    known = open_clip.list_pretrained_tags_by_model(src.name)
    raise DgmrError(f"unknown pretrained tag {src.tag!r} for open_clip:{src.name}: "
                    + (f"open_clip knows {', '.join(known[:8])}{' ...' if len(known) > 8 else ''}" if known else
                       "open_clip has no pretrained weights for it (drop the tag with --random-init)")
                    + " (or give a checkpoint file)")


def _build_open_clip(src: Source, pretrained: bool, where: str) -> nn.Module:
    import open_clip

    if src.name.startswith(HUB_SCHEMES) and src.model_cfg is not None and not pretrained:
        # a model repository's architecture, from the recorded config: rebuilt without the folder
        digest = hashlib.sha1(json.dumps(src.model_cfg, sort_keys=True).encode()).hexdigest()[:12]
        return _build_open_clip(Source("open_clip", f"dgmr-repo-{digest}", kwargs=src.kwargs,
                                       model_cfg=src.model_cfg), False, where)
    if src.name.startswith("local-dir:") and src.model_cfg is None:
        path = Path(src.name.removeprefix("local-dir:")) / "open_clip_config.json"
        if not path.is_file():
            raise DgmrError(f"open_clip:{src.name}: no {path} (open_clip's local-dir folders hold one)")
        cfg = read_json_file(path, "open_clip config")
        src.model_cfg = cfg.get("model_cfg") if isinstance(cfg, dict) else None
    if src.model_cfg is not None and not src.name.startswith(HUB_SCHEMES):
        register_open_clip_config(src.name, src.model_cfg)
    if not src.name.startswith(("hf-hub:", "local-dir:")) and open_clip.get_model_config(src.name) is None:
        raise DgmrError(f"unknown open_clip architecture {src.name!r} (see open_clip.list_models())")
    if pretrained and not src.tag and not src.name.startswith(("hf-hub:", "local-dir:")):
        raise DgmrError(f"open_clip:{src.name} needs a pretrained tag (open_clip:{src.name}:TAG, see "
                        "open_clip.list_pretrained()) or --random-init")
    if src.tag and where != "empty":  # not when dgmr.load rebuilds what an older dgmr recorded
        _check_open_clip_tag(src)
    tag = src.tag if pretrained else None
    # open_clip warns "initialized randomly" without weights: untrue on meta / for dgmr.load
    quiet = contextlib.nullcontext() if where == "cpu" else _no_warnings()
    with quiet:
        model = open_clip.create_model(src.name, pretrained=tag, load_weights=pretrained,
                                       device={"meta": "meta", "empty": None}.get(where, "cpu"), **src.kwargs)
    if src.model_cfg is None:
        src.model_cfg = open_clip.get_model_config(src.name)
    return model


def _build_hf(src: Source, pretrained: bool, where: str) -> nn.Module:
    import transformers

    if src.model_cfg is not None:
        cfg = dict(src.model_cfg)
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        config = transformers.AutoConfig.from_pretrained(src.name)
    for k, v in src.kwargs.items():
        setattr(config, k, v)
    cls = getattr(transformers, src.hf_class) if src.hf_class else transformers.AutoModel
    if pretrained:
        model = cls.from_pretrained(src.name, config=config)
    else:
        model = cls.from_config(config) if cls is transformers.AutoModel else cls._from_config(config)
    src.hf_class = type(model).__name__
    src.model_cfg = model.config.to_diff_dict() | {"model_type": model.config.model_type}
    return model


BUILDERS = {"timm": _build_timm, "open_clip": _build_open_clip, "hf": _build_hf}


def build_model(src: Source, *, pretrained: bool = True, meta: bool = False, empty: bool = False) -> nn.Module:
    """Build the architecture of ``src``: with its published weights (``pretrained``), randomly
    initialised, with shapes only on the ``meta`` device (no memory, no download), or
    ``empty``: parameters on meta but buffers real, ready for ``load_state_dict(assign=True)``."""
    where = "meta" if meta else "empty" if empty else "cpu"
    if where != "cpu":
        pretrained = False
    try:
        with _device_ctx(where):
            model = BUILDERS[src.library](src, pretrained, where)
    except DgmrError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        hint = " (no network? pass --random-init, or a local directory)" if pretrained else ""
        first = first_line(e)
        raise DgmrError(f"could not build {src.spec}: {first}{hint}") from e
    return model.eval()
