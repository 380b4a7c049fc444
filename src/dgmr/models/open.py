"""Opening a model: the one place that turns what a user typed (a spec or a dgmr directory)
into a source, a config and a built model, with one wording for every mistake."""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..core.errors import DgmrError
from .artifact import load, read_config
from .sources import Source, build_model, is_dgmr_dir, library_layout, parse_spec


def model_source(model: str | os.PathLike, *, model_kwargs: dict[str, Any] | None = None,
                 role: str = "") -> tuple[Source | None, dict[str, Any] | None]:
    """(source, dgmr config) of a spec (config None) or a dgmr directory (source None when
    it records none); any other directory is an error naming ``role`` (e.g. "teacher")."""
    if is_dgmr_dir(model):
        cfg = read_config(model)
        return (Source.from_dict(cfg["source"]) if cfg.get("source") else None), cfg
    if os.path.isdir(str(model)):
        who = f"{role} " if role else ""
        spec = library_layout(model)
        if spec is not None:
            raise DgmrError(f"{who}{model} is not a dgmr model directory but a {spec.split(':')[0]} model folder: "
                            f"open it as {spec}")
        raise DgmrError(f"{who}{model} is not a dgmr model directory (a library's model folder opens as "
                        f"timm:local-dir:{model}, open_clip:local-dir:{model} or hf:{model})")
    return parse_spec(str(model), model_kwargs), None


def architecture_source(model: str | os.PathLike | Source, *, model_kwargs: dict[str, Any] | None = None,
                        role: str = "MODEL") -> Source:
    """The :class:`Source` of an architecture spec, for commands that take the weights from
    elsewhere (``prune --weights``, ``import``): a directory is refused, naming ``role``."""
    if isinstance(model, Source):
        return model
    if os.path.isdir(str(model)):
        raise DgmrError(f"{role} must name an architecture (timm:NAME, open_clip:ARCH, hf:DIR), "
                        f"not the directory {model}")
    return parse_spec(str(model), model_kwargs)


def open_model_with_config(model: str | os.PathLike, *, random_init: bool = False,
                           model_kwargs: dict[str, Any] | None = None, role: str = ""
                           ) -> tuple[nn.Module, Source | None, dict[str, Any] | None]:
    """(model, source, dgmr config or None) from a spec or a dgmr directory."""
    src, cfg = model_source(model, model_kwargs=model_kwargs, role=role)
    if cfg is None:
        return build_model(src, pretrained=not random_init), src, None
    if cfg.get("weights_scope"):
        raise DgmrError(f"{model} holds only the vision tower ({cfg['weights_scope']!r}): open it in Python with "
                        f"dgmr.load; the dgmr commands need a whole model (prune a whole-model checkpoint)")
    return load(model), src, cfg


def open_model(model: str | os.PathLike, *, random_init: bool = False,
               model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Source | None]:
    """A model and its source from a spec (``timm:...``) or a dgmr directory."""
    net, src, _ = open_model_with_config(model, random_init=random_init, model_kwargs=model_kwargs)
    return net, src


def model_path(model: Any) -> str | None:
    """The file-system path a model argument names: a dgmr directory, ``hf:DIR``,
    ``timm:local-dir:DIR`` or ``open_clip:local-dir:DIR`` when DIR exists, an open_clip TAG that is a file; ``None`` for
    hub specs (``timm:NAME``), modules and :class:`~dgmr.models.sources.Source` objects."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    s = os.fspath(model)
    try:
        src = parse_spec(s)
    except DgmrError:
        return s  # a directory dgmr wrote (or a path that will not open: harmless to compare)
    if src.library == "hf":
        candidates = [src.name]
    else:
        candidates = [src.name.removeprefix("local-dir:")] if src.name.startswith("local-dir:") else []
        candidates += [src.tag] if src.tag else []
    return next((c for c in candidates if os.path.exists(c)), None)
