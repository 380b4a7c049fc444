"""How the student trains on one or many processes: its feature call as a module
(:class:`FeatureNet`) inside DDP or FSDP2 (``fully_shard`` per transformer block,
:func:`wrap_student`), ``torch.compile`` with its eager fallback (:class:`FeatureCalls`), the
attention backend, and what sharded parameters need: DTensor access (:func:`full_tensor`,
:func:`local_tensor`), full state dicts gathered or set under FSDP, and the fingerprint that
shows ranks hold identical weights.

The FSDP, DDP and DTensor modules are imported only when a run uses them; DTensors are
recognised by their methods, which plain tensors lack.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import nn

from ..core import dist as D
from ..core.errors import DgmrError, first_line
from ..models.families import Family


class FeatureNet(nn.Module):
    """``family.features`` as a module, so DDP/FSDP see the call that computes the loss."""

    def __init__(self, model: nn.Module, family: Family):
        super().__init__()
        self.model, self.family = model, family

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.family.features(self.model, x)


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """``torch.nn.attention.sdpa_kernel`` with backend ``name`` tried first ("auto": no change)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH) if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


# ---------------------------------------------------------------------------------------
# DTensors (FSDP2's parameters, gradient norms and EMA)


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "to_local")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: all ranks call it); a plain tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The local shard of ``full`` laid out as the DTensor ``like`` (a collective: all ranks call it)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements).to_local()


def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Fill ``dst`` (a DTensor or a plain tensor) from the whole tensor ``full``."""
    local_tensor(dst).copy_(shard_like(full, dst) if is_dtensor(dst) else full)


def fingerprint(model: nn.Module) -> list[float]:
    """Sums of the full parameters (identical across ranks iff training stayed in sync)."""
    total, total_abs, weighted = 0.0, 0.0, 0.0
    for i, p in enumerate(model.parameters()):
        t = full_tensor(p).detach().double()
        total += float(t.sum())
        total_abs += float(t.abs().sum())
        weighted += float(t.sum()) * (i + 1)
    return [total, total_abs, weighted]


# ---------------------------------------------------------------------------------------
# wrapping


def block_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """The transformer blocks (the modules that hold each MLP): FSDP's sharding units."""
    blocks = []
    for site in family.mlps(model):
        parent = site.name.rsplit(".", 1)[0] if "." in site.name else ""
        m = model.get_submodule(parent) if parent else site.module
        if all(m is not b for b in blocks):
            blocks.append(m)
    return blocks


def wrap_student(model: nn.Module, family: Family, info: D.DistInfo, *, fsdp: bool,
                 param_dtype: torch.dtype | None) -> tuple[nn.Module, nn.Module | None]:
    """The student's feature call inside DDP, or with ``fsdp`` FSDP2 per block (parameters in
    ``param_dtype`` for the compute when given, gradients reduced in fp32); and under FSDP, on
    rank 0, a meta-device copy of the architecture taken before sharding (:func:`unsharded_copy`)."""
    net: nn.Module = FeatureNet(model, family)
    shell = None
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if info.is_main:  # for the export: the architecture without a second copy of the weights
            shell = copy.deepcopy(model).to("meta")
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
            else MixedPrecisionPolicy()
        for block in block_modules(model, family):
            fully_shard(block, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return net, shell


def unsharded_copy(shell: nn.Module, full_state: dict[str, torch.Tensor]) -> nn.Module:
    """``shell`` (a meta-device copy taken before sharding) filled with the gathered full weights."""
    shell = shell.to_empty(device="cpu")
    shell.load_state_dict(full_state, strict=True)
    return shell


def compile_mode(setting: str, cuda: bool, sharded: bool) -> str | None:
    """The ``compile`` setting resolved for :class:`FeatureCalls`: "on", "max-autotune" or None
    (eager); auto is on on CUDA (FSDP2 stays eager under auto)."""
    if setting == "auto":
        return "on" if cuda and not sharded else None
    return None if setting == "off" else setting


class FeatureCalls:
    """The student's and the teacher's feature calls a training step makes: compiled for a
    ``mode`` (lazily: ``torch.compile`` works at the first call), else the eager modules. While
    :attr:`pending` (compiled, no step done yet) a failure may be the compiler's:
    :meth:`fall_back_to_eager`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, mode: str | None):
        self.student_net, self.teacher_net = student, teacher
        self.student, self.teacher = student, teacher
        self.pending = mode is not None
        if mode is not None:
            options = "max-autotune-no-cudagraphs" if mode == "max-autotune" else None
            self.student, self.teacher = torch.compile(student, mode=options), torch.compile(teacher, mode=options)

    def fall_back_to_eager(self, e: Exception) -> None:
        """A compiler problem costs speed, not the run: warn and use the eager modules."""
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); training without it")
        self.student, self.teacher = self.student_net, self.teacher_net
        self.pending = False


# ---------------------------------------------------------------------------------------
# full state dicts


def full_state_dicts(model: nn.Module, optim: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """The model's and optimizer's state dicts, gathered whole on the CPU under FSDP (a
    collective: all ranks call it)."""
    if not sharded:
        return model.state_dict(), optim.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's weights gathered whole on the CPU (a collective: all ranks call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_full_state_dicts(model: nn.Module, optim: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load whole state dicts into a sharded model and its optimizer (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optim, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def load_training_state(model: nn.Module, optim: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None,
                        ckpt: dict[str, Any], *, sharded: bool, where: str) -> None:
    """A checkpoint's student, optimizer and EMA into a (possibly sharded) model, optimizer and
    EMA; a checkpoint that does not fit is one error, ``where`` and torch's telling line."""
    if sharded:
        set_full_state_dicts(model, optim, ckpt["student"], ckpt["optimizer"])
    else:
        try:
            model.load_state_dict(ckpt["student"])
            optim.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                          first_line(e))  # torch's first line only says "Error(s) in loading state_dict"
            raise DgmrError(f"{where}: {detail[:300]}") from None
    if ema is not None:
        with torch.no_grad():
            for n, t in ema.items():
                copy_full_(t, ckpt["ema"][n])
