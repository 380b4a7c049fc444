"""The teacher and the student a run distills: opened (:func:`open_model`), checked as a pair
(:func:`check_pair`), and probed for the student parameters that training can change
(:func:`probe_trainable`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from torch import nn

from ..core.errors import DgmrError, first_line
from ..models.families import Family, family_of
from ..models.open import open_model_with_config
from ..models.sources import Source
from .losses import feature_loss
from .settings import DistillSettings


def open_model(model: nn.Module | str | os.PathLike, role: str, settings: DistillSettings
               ) -> tuple[nn.Module, Source | None, dict | None]:
    """(module, source, dgmr config or None) for a spec, a dgmr directory or a module."""
    if isinstance(model, nn.Module):
        return model, None, None
    # --random-init weights come from the seed (teacher and student apart): a resumed run
    # rebuilds the very teacher it trained against; the global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + (0 if role == "teacher" else 1))
        return open_model_with_config(model, random_init=settings.random_init, model_kwargs=settings.model_kwargs,
                                      role=role)


def check_pair(teacher: nn.Module, student: nn.Module) -> Family:
    """The shared family of teacher and student; rejects pairs distillation cannot match."""
    ft, fs = family_of(teacher), family_of(student)
    if ft.name != fs.name:
        raise DgmrError(f"teacher is a {ft.name} model but student is a {fs.name} model: distill within one family")
    if type(teacher) is not type(student):
        raise DgmrError(f"teacher is a {type(teacher).__name__} but student is a {type(student).__name__}")
    t_sites = {s.name: s for s in ft.mlps(teacher)}
    s_sites = {s.name: s for s in fs.mlps(student)}
    if set(t_sites) != set(s_sites):
        raise DgmrError(f"teacher and student have different MLP layouts ({len(t_sites)} vs {len(s_sites)} MLPs)")
    for name, s in s_sites.items():
        t = t_sites[name]
        if s.in_features != t.in_features:
            raise DgmrError(f"{name}: student width {s.in_features} differs from the teacher's {t.in_features}")
        if s.hidden > t.hidden:
            raise DgmrError(f"student is wider than the teacher at {name} ({s.hidden} > {t.hidden} hidden neurons): "
                            "did you swap --teacher and --student?")
    _check_heads(ft, teacher, student)
    return ft


def _check_heads(family: Family, teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student attention: the same layers, the same head dim, the student's heads
    no more than the teacher's."""
    t_sites = {s.name: s for s in family.attention(teacher)}
    s_sites = {s.name: s for s in family.attention(student)}
    if set(t_sites) != set(s_sites):
        raise DgmrError(f"teacher and student have different attention layouts ({len(t_sites)} vs {len(s_sites)} "
                        "attention layers)")
    for name, s in s_sites.items():
        t = t_sites[name]
        if s.head_dim != t.head_dim:
            raise DgmrError(f"{name}: student head dim {s.head_dim} differs from the teacher's {t.head_dim}")
        if s.heads > t.heads:
            raise DgmrError(f"student has more attention heads than the teacher at {name} ({s.heads} > {t.heads}): "
                            "did you swap --teacher and --student?")


def probe_trainable(teacher: nn.Module, student: nn.Module, family: Family, *, image_size: int, device: torch.device,
                    seed: int, autocast: Callable[[], contextlib.AbstractContextManager]
                    ) -> list[tuple[str, nn.Parameter]]:
    """One forward/backward on noise: the feature shapes must match, and only the parameters
    that get a gradient are trained (a CLIP text tower or an unused head stays frozen)."""
    vision = family.vision_root(student)[1]
    student.requires_grad_(False)
    vision.requires_grad_(True)
    student.train()
    torch.manual_seed(seed)
    x = torch.randn(2, 3, image_size, image_size, device=device)
    try:
        with torch.no_grad(), autocast():
            tf = family.features(teacher, x)
        with autocast():
            sf = family.features(student, x)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise DgmrError(f"the models do not run at {image_size}px: {first_line(e)}") from e
    for key in ("pooled", "tokens"):
        if tuple(tf[key].shape) != tuple(sf[key].shape):
            raise DgmrError(f"teacher and student {key} features differ in shape: {tuple(tf[key].shape)} vs "
                            f"{tuple(sf[key].shape)}")
    feature_loss(sf, tf)[0].backward()
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    for n, p in named:
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise DgmrError("no student parameter influences the distillation features")
    return trainable


def module_state(model: nn.Module, full: bool) -> tuple[nn.Module, list, list, tuple | None]:
    """What :func:`restore_module_state` puts back on a module a caller passed in: each
    submodule's train/eval mode, each parameter's requires_grad and, with ``full``, its device and dtype."""
    p = next(model.parameters(), None)
    where = (p.device, p.dtype) if full and p is not None else None
    return (model, [(m, m.training) for m in model.modules()], [(q, q.requires_grad) for q in model.parameters()], where)


def restore_module_state(model: nn.Module, modes: list, grads: list, where: tuple | None) -> None:
    for m, training in modes:
        m.training = training
    for q, requires_grad in grads:
        q.requires_grad_(requires_grad)
    if where is not None:
        model.to(device=where[0], dtype=where[1])
