"""Helpers the test modules share (``conftest.py`` turns the ones that need pytest into fixtures).

* :func:`image_folder` writes every generated image folder the tests use (ImageFolder layout,
  solid colours or noise, fixed or varying sizes, one seed for all the pixels);
* :func:`run_cli` runs ``dgmr`` in-process and returns ``(exit code, stdout, stderr)``;
* ``TINY_VIT_*``: the tiny random-init timm ViT most command-line tests prune;
* :class:`MeanColor`: a model whose feature is known (evaluation tests);
* :func:`under_strace`: a Python child with faults injected at its syscalls (strace);
* :func:`tree_bytes`: every file of an output directory, sub-folders included (to compare before/after).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from dgmr.cli import main

TINY_VIT_SPEC = "timm:vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2}
# `dgmr prune TINY_VIT_ARGV ...`: the spec, random weights, the small architecture
TINY_VIT_ARGV = (TINY_VIT_SPEC, "--random-init", "--model-kwargs", json.dumps(TINY_VIT_KWARGS))

Size = tuple[int, int]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """The content of every file under ``root``, by its path relative to ``root`` (a dgmr
    directory has sub-folders: ``dgmr/kept_indices.safetensors``)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``dgmr ARGV`` in this process: (exit code, captured stdout, captured stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def image_folder(
    root: str | Path,
    classes: Mapping[str, tuple[int, int, int]] | Sequence[str],
    per_class: int | Mapping[str, int] = 1,
    *,
    seed: int = 0,
    style: str = "color",
    size: Size | Callable[[int], Size] = (20, 20),
    jitter: int = 0,
    noise: int = 0,
    disc: bool = False,
    cells: Size | None = None,
    interleave: bool = False,
    name: str = "{j}.png",
) -> list[Path]:
    """Write generated PNGs as ``root/CLASS/NAME``; returns their paths in the order written.

    ``classes``: class names, or (for ``style="color"``) a name -> (r, g, b) mapping.
    ``per_class``: images per class, one count or a name -> count mapping. Images are
    written class after class, or round-robin over the classes with ``interleave``; ``name``
    is formatted with ``i`` (the image's index among all written) and ``j`` (its index in
    its class). ``size`` is (width, height), or a function of ``i``.

    ``style="color"``: the class colour, shifted per image by up to +-``jitter`` per channel
    and per pixel by up to +-``noise``; with ``disc`` a grey disc (a third of the size, random
    place and grey level) on top. ``style="noise"``: uniform random pixels on a grid of
    ``cells`` (width, height; default one cell per pixel) resized bilinearly to ``size``.

    One ``numpy.random.default_rng(seed)`` draws everything, image after image, in the
    order written: the same call writes the same pixels.
    """
    if style not in ("color", "noise"):
        raise ValueError(f"style must be 'color' or 'noise', got {style!r}")
    if style == "color" and not isinstance(classes, Mapping):
        raise ValueError("style='color' needs a class name -> (r, g, b) mapping")
    root = Path(root)
    names = list(classes)
    counts = {c: per_class[c] if isinstance(per_class, Mapping) else per_class for c in names}
    if interleave:
        order = [(c, j) for j in range(max(counts.values(), default=0)) for c in names if j < counts[c]]
    else:
        order = [(c, j) for c in names for j in range(counts[c])]
    rng = np.random.default_rng(seed)
    paths = []
    for i, (c, j) in enumerate(order):
        w, h = size(i) if callable(size) else size
        if style == "noise":
            cw, ch = cells or (w, h)
            im = Image.fromarray(rng.integers(0, 255, (ch, cw, 3), dtype=np.uint8))
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
        else:
            pix = np.broadcast_to(np.asarray(classes[c], dtype=np.int64), (h, w, 3))
            if jitter:
                pix = pix + rng.integers(-jitter, jitter + 1, 3)
            if noise:
                pix = pix + rng.integers(-noise, noise + 1, (h, w, 3))
            im = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8))
            if disc:
                x, y = int(rng.integers(0, w // 2 + 1)), int(rng.integers(0, h // 2 + 1))
                grey = int(rng.integers(0, 256))
                ImageDraw.Draw(im).ellipse([x, y, x + w // 3, y + h // 3], fill=(grey,) * 3)
        path = root / c / name.format(i=i, j=j)
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        paths.append(path)
    return paths


def tiny_teacher_student(root: Path, **model_kwargs) -> tuple[Path, Path]:
    """A random-init tiny ViT saved unpruned (``root/teacher``) and its r=1 prune (``root/student``)."""
    import torch

    import dgmr
    from dgmr.models.sources import build_model, parse_spec

    torch.manual_seed(0)
    src = parse_spec(TINY_VIT_SPEC, {**TINY_VIT_KWARGS, **model_kwargs})
    dgmr.save(build_model(src, pretrained=False), root / "teacher", source=src)
    student, record = dgmr.prune(dgmr.load(root / "teacher"), mlp_ratio=1, progress=False)
    dgmr.save(student, root / "student", source=src, record=record)
    return root / "teacher", root / "student"


def _run_inputs(root: Path) -> dict[str, Path]:
    return {"root": root, "teacher": root / "teacher", "student": root / "student", "images": root / "images"}


def tiny_run_inputs(root: Path, per_class: int = 4) -> dict[str, Path]:
    """What a tiny distillation run reads: :func:`tiny_teacher_student` plus 2 x ``per_class``
    noise images (36 px) under ``root/images``."""
    tiny_teacher_student(root)
    image_folder(root / "images", ["a", "b"], per_class, style="noise", size=(36, 36))
    return _run_inputs(root)


def varied_run_inputs(root: Path) -> dict[str, Path]:
    """:func:`tiny_teacher_student` plus 24 smooth random images (low-frequency noise
    upsampled) of various sizes, in ImageFolder-style nesting whose labels a distillation
    ignores: 000.png in dog/, 001.png in cat/, ..."""
    tiny_teacher_student(root)
    image_folder(root / "images", ["dog", "cat"], 12, style="noise", cells=(5, 6), interleave=True,
                 size=lambda i: (40 + i % 3 * 8, 36 + i % 4 * 6), name="{i:03d}.png")
    return _run_inputs(root)


class MeanColor(nn.Module):
    """A model whose feature is known: the mean colour of the (normalised) image (an identity
    linear layer on top, so it has weights to hash and count)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3, bias=False)
        nn.init.eye_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean((2, 3)))


# a child process of the tests: one thread, this checkout's dgmr first
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


@functools.cache
def strace_ok() -> bool:
    """Whether strace runs here (installed, ptrace permitted): the syscall fault injection's tool."""
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True).returncode == 0


@functools.cache
def _seccomp() -> bool:
    return strace_ok() and subprocess.run(["strace", "--seccomp-bpf", "-f", "-o", os.devnull, "-e", "trace=rename",
                                            "true"], capture_output=True).returncode == 0


def under_strace(argv: list[str], *inject: str) -> subprocess.CompletedProcess:
    """``argv`` (a Python child) with faults injected at syscalls: ``inject`` are strace
    ``-e inject=`` specs, e.g. ``renameat2:error=EIO`` or ``rename:signal=KILL:when=2``."""
    traced = sorted({spec.split(":")[0] for spec in inject})
    cmd = ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={','.join(traced)}", "-e", "signal=none"]
    if _seccomp() and not any("signal=" in spec for spec in inject):  # strace 5.3+: only the traced syscalls stop
        cmd.append("--seccomp-bpf")  # (strace injects no signal under it)
    for spec in inject:
        cmd += ["-e", f"inject={spec}"]
    return subprocess.run([*cmd, sys.executable, *argv], capture_output=True, text=True, timeout=300, env=CHILD_ENV)
