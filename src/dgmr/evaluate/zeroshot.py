"""CLIP-style towers (image + text) and zero-shot classification.

Class embeddings are the normalised mean over prompt templates of the normalised text
embeddings (the OpenAI recipe); an image is assigned the class of highest cosine
similarity. The 80 OpenAI ImageNet templates and the 1000 ImageNet class names ship with
the package (:func:`imagenet_templates`, :func:`imagenet_classnames`).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DgmrError, first_line
from ..models.families import family_of
from ..models.sources import Source, register_open_clip_config
from .metrics import classification_metrics, top_indices

TextEncoder = Callable[[Sequence[str]], torch.Tensor]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def _package_lines(name: str) -> list[str]:
    text = (resources.files("dgmr.evaluate") / "assets" / name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1K class names used for CLIP zero-shot (OpenAI's list, in synset order)."""
    return _package_lines("imagenet_classnames.txt")


def imagenet_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates, with ``{}`` where the class name goes."""
    return _package_lines("openai_imagenet_templates.txt")


@dataclass
class ClipTowers:
    """The two encoders of a CLIP-style model: ``encode_image(x)`` and ``encode_text(texts)``
    (unnormalised embeddings in the joint space)."""

    kind: str
    model: nn.Module
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: TextEncoder


def _hf_output(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)  # transformers 5 returns the projected embeds here
    if pooled is None:
        raise DgmrError("the Hugging Face model returned no pooled embedding")
    return pooled


def _open_clip_tokenizer(model: nn.Module, src: Source | None) -> Callable[[Sequence[str]], torch.Tensor]:
    import open_clip

    ctx = getattr(model, "context_length", None)
    name = src.name if src is not None else ""
    if src is not None and src.model_cfg is not None and open_clip.get_model_config(name) is None \
            and not name.startswith(("hf-hub:", "local-dir:")):
        register_open_clip_config(name, src.model_cfg)
    try:
        # an unknown architecture name falls back to open_clip's default SimpleTokenizer
        return open_clip.get_tokenizer(name, context_length=ctx)
    except Exception as e:  # HF tokenizers need their files: a download or a local cache
        first = first_line(e)
        raise DgmrError(f"could not load the open_clip tokenizer for {name or 'this model'}: {first} "
                        "(no network? the tokenizer files must be cached locally)") from e


def _hf_tokenizer(model: nn.Module, candidates: Sequence[str | Path]) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
    import transformers

    tok = None
    errors = []
    vocab = int(getattr(getattr(model.config, "text_config", None), "vocab_size", 0) or 0)
    for c in candidates:
        if Path(str(c)).is_dir() and not any((Path(str(c)) / f).is_file() for f in TOKENIZER_FILES):
            continue  # transformers would build an empty tokenizer from a bare model dir
        try:
            cand = transformers.AutoTokenizer.from_pretrained(str(c), local_files_only=True)
        except Exception as e:  # not there: try the next place
            errors.append(f"{c}: {first_line(e)}")
            continue
        if len(cand) <= 2 or (vocab and len(cand) > vocab):
            continue  # an empty placeholder, or ids the text tower cannot embed
        tok = cand
        break
    if tok is None:
        raise DgmrError("no tokenizer found locally for this Hugging Face model (looked in "
                        + ", ".join(str(c) for c in candidates) + "); save one next to the model "
                        "(tokenizer.save_pretrained(DIR)) or cache it with the hub first")
    text_cfg = getattr(model.config, "text_config", None)
    max_len = int(getattr(text_cfg, "max_position_embeddings", 77) or 77)
    siglip = getattr(model.config, "model_type", "").startswith("siglip")

    def tokenize(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained on max-length padded text; CLIP pools at the EOS token, any padding works
        enc = tok(list(texts), padding="max_length" if siglip else True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask") and not (siglip and k == "attention_mask")}

    return tokenize


def clip_image_encoder(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The image half of a CLIP-style model (embeddings in the joint space, what clip_benchmark's
    linear probe trains on), or None for a model without a text tower."""
    family = family_of(model)
    if family.name == "open_clip" and hasattr(model, "encode_text"):
        return lambda x: model.encode_image(x)
    if family.name == "hf" and hasattr(model, "get_text_features") and hasattr(model, "get_image_features"):
        return lambda x: _hf_output(model.get_image_features(pixel_values=x))
    return None


def clip_towers(model: nn.Module, src: Source | None = None, *, model_dir: str | Path | None = None) -> ClipTowers:
    """Wrap an open_clip model or a Hugging Face CLIP/SigLIP model; anything else is an error."""
    family = family_of(model)
    encode_image = clip_image_encoder(model)  # None: no text tower
    if encode_image is None:
        raise DgmrError(f"zero-shot and retrieval need a CLIP-style model with a text tower (open_clip, or Hugging "
                        f"Face CLIP/SigLIP); this is a {type(model).__name__} ({family.name} family) without one "
                        "(give --text-model ORIGINAL_CLIP to pair a pruned image tower with its text tower)")
    if family.name == "open_clip":
        tokenizer = _open_clip_tokenizer(model, src)

        def enc_text_oc(texts: Sequence[str]) -> torch.Tensor:
            dev = next(model.parameters()).device
            return model.encode_text(tokenizer(list(texts)).to(dev))

        return ClipTowers("open_clip", model, encode_image, enc_text_oc)
    candidates: list[str | Path] = []
    if model_dir is not None:
        candidates += [Path(model_dir), Path(model_dir) / "hf"]  # hf/: the layout dgmr wrote before
    if src is not None:
        candidates.append(src.name)
    tokenize = _hf_tokenizer(model, candidates)

    def enc_text_hf(texts: Sequence[str]) -> torch.Tensor:
        dev = next(model.parameters()).device
        return _hf_output(model.get_text_features(**{k: v.to(dev) for k, v in tokenize(texts).items()}))

    return ClipTowers("hf", model, encode_image, enc_text_hf)


@torch.no_grad()
def encode_texts(encode_text: TextEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (float32, CPU), in batches."""
    out = [F.normalize(encode_text(texts[s:s + batch_size]).float(), dim=-1).cpu() for s in range(0, len(texts), batch_size)]
    return torch.cat(out)


CLASS_SLOTS = ("{c}", "{}")


def fill_template(template: str, classname: str) -> str:
    """The prompt of ``template`` for ``classname`` by ``str.format``, as clip_benchmark
    (``t.format(c=name)``) and OpenAI's lists (``t.format(name)``) fill them: ``{c}`` or
    ``{}`` is where the name goes, ``{{``/``}}`` are literal braces."""
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields == {"c"}:
            return template.format(c=classname)
        if fields == {""}:
            return template.format(classname)
    except (ValueError, IndexError, KeyError):
        pass
    raise DgmrError(f"template {template!r} must hold one kind of class slot, {{c}} or {{}} "
                    "(literal braces doubled: {{ }})")


def _prompts(classnames: Sequence[str], templates: Sequence[str] | dict[str, Sequence[str]]) -> list[list[str]]:
    """Per class, its prompts: from shared templates, or a {class name: [prompts]} map
    (class-specific prompts, e.g. CuPL, as clip_benchmark accepts them)."""
    if isinstance(templates, dict):
        missing = [c for c in classnames if not templates.get(c)]
        if missing:
            raise DgmrError(f"the per-class prompts have none for class {missing[0]!r} (a per-dataset templates "
                            "file needs --dataset NAME)")
        return [[str(t) for t in templates[c]] for c in classnames]
    if not templates:
        raise DgmrError("no prompt templates")
    bad = [t for t in templates if not any(slot in t for slot in CLASS_SLOTS)]
    if bad:
        raise DgmrError(f"prompt template {bad[0]!r} has no '{{c}}' or '{{}}' where the class name goes")
    return [[fill_template(t, c) for t in templates] for c in classnames]


@torch.no_grad()
def text_classifier(encode_text: TextEncoder, classnames: Sequence[str],
                    templates: Sequence[str] | dict[str, Sequence[str]], batch_size: int = 256) -> torch.Tensor:
    """(C, D) class embeddings: per class, the mean over its prompts of the normalised text
    embeddings, normalised again."""
    if not classnames:
        raise DgmrError("no class names")
    prompts = _prompts(classnames, templates)
    counts = [len(p) for p in prompts]
    emb = encode_texts(encode_text, [t for p in prompts for t in p], batch_size)
    means = torch.stack([chunk.mean(0) for chunk in emb.split(counts)])
    return F.normalize(means, dim=-1)


@torch.no_grad()
def zeroshot_classify(image_feats: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                      chunk: int = 4096) -> dict[str, Any]:
    """Top-1, top-5 (None below 5 classes) and mean per-class recall of cosine-similarity
    classification of ``image_feats`` (N, D) against the class embeddings ``classifier`` (C, D)."""
    if len(image_feats) == 0:
        raise DgmrError("the evaluation split is empty")
    if image_feats.shape[1] != classifier.shape[1]:
        raise DgmrError(f"image embeddings have {image_feats.shape[1]} dims, text embeddings {classifier.shape[1]}: "
                        "the image and text towers do not belong together")
    if int(labels.max()) >= len(classifier):
        raise DgmrError(f"labels go up to {int(labels.max())} but there are {len(classifier)} class names")
    w = classifier.float()
    top = torch.cat([top_indices(F.normalize(image_feats[s:s + chunk].float(), dim=-1) @ w.T)
                     for s in range(0, len(image_feats), chunk)])
    return {"metric": "zeroshot", **classification_metrics(top, labels, len(w)), "n_test": len(image_feats),
            "num_classes": len(w)}
