"""Where the MLPs are, and the one surgery routine that shrinks them.

An MLP "kind" says how one library lays out an MLP module: which projection's rows are
hidden neurons, whether gate and up projections are separate or packed in one Linear, which
norms run over the hidden dimension, and which projection's columns read the hidden layer.
A projection is an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (the same matrix applied at every
pixel of an NCHW map: ConvNeXt with ``conv_mlp=True``, MetaFormer/PoolFormer). Kinds are
registered with :func:`register_mlp_kind`; :func:`find_mlps` walks a module tree and returns
one :class:`MlpSite` per MLP. :func:`shrink_mlp` is the only code that changes weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ...core.errors import DgmrError
from ...core.registry import Registry
from .slicing import Proj, norm_tensors, per_channel_groups, sliceable_norm, take_cols, take_norm, take_rows
from .walk import find_sites, walk


def in_dim(m: Proj) -> int:
    """Input features of a Linear, input channels of a 1x1 conv."""
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def out_dim(m: Proj) -> int:
    """Output features of a Linear, output channels of a 1x1 conv."""
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def matrix(m: Proj) -> torch.Tensor:
    """The weight as an (out, in) matrix; a conv's (out, in, 1, 1) weight is flattened (a
    view when contiguous, so scoring reads it without a copy)."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.flatten(1)


@dataclass
class MlpSite:
    """One MLP of a model.

    Projections are ``nn.Linear`` or 1x1 ``nn.Conv2d`` (weight (out, in, 1, 1)). ``up``
    holds one row per hidden neuron (for ``packed`` gated MLPs it holds the gate
    rows and the up rows stacked: ``"gate_first"`` = [gate; up], ``"gate_last"`` = [up;
    gate]). ``gate`` is a separate gate Linear, if any. ``norms`` normalise over the hidden
    dimension. ``down`` reads the hidden layer (its columns are hidden neurons).
    """

    name: str
    module: nn.Module
    kind: str
    up: Proj
    down: Proj
    gate: Proj | None = None
    packed: str | None = None
    norms: list[nn.Module] = field(default_factory=list)

    @property
    def hidden(self) -> int:
        return in_dim(self.down)

    @property
    def in_features(self) -> int:
        return in_dim(self.up)

    @property
    def parts(self) -> list[nn.Module]:
        """Every module :func:`shrink_mlp` cuts: up, gate, hidden-dim norms, down."""
        return [m for m in (self.up, self.gate, *self.norms, self.down) if m is not None]

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.packed is not None

    def scoring_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w1, w_gate): the up weight and the gate weight (None when not gated), as
        (hidden, in) matrices (a 1x1 conv's (h, d, 1, 1) weight is viewed as (h, d))."""
        w = matrix(self.up)
        h = self.hidden
        if self.packed == "gate_first":
            return w[h:], w[:h]
        if self.packed == "gate_last":
            return w[:h], w[h:]
        return w, (matrix(self.gate) if self.gate is not None else None)


# ---------------------------------------------------------------------------------------
# kinds registry
MlpKind = Callable[[str, nn.Module], "MlpSite | None"]
MLP_KINDS: Registry[MlpKind] = Registry("MLP kind")


def register_mlp_kind(name: str, *, replace: bool = False, builtin: bool = False) -> Callable[[MlpKind], MlpKind]:
    """Register ``fn(path, module) -> MlpSite | None``. Kinds a user registers are tried
    before the built-ins (so a precise kind wins over the permissive ``fc1_fc2``); an
    existing name is refused unless ``replace=True``."""
    return MLP_KINDS.decorator(name, replace=replace, builtin=builtin)


def _linear(module: nn.Module, attr: str) -> nn.Linear | None:
    m = getattr(module, attr, None)
    return m if isinstance(m, nn.Linear) else None


def _conv1x1(module: nn.Module, attr: str) -> nn.Conv2d | None:
    """``module.attr`` if it is a 1x1 ungrouped Conv2d: only then is it one (out, in) matrix
    applied at every pixel, whose output/input channels can be cut like a Linear's rows/columns."""
    m = getattr(module, attr, None)
    if not isinstance(m, nn.Conv2d) or tuple(m.kernel_size) != (1, 1) or m.groups != 1:
        return None
    return m


def _hidden_norms(module: nn.Module, attrs: tuple[str, ...], hidden: int, path: str) -> list[nn.Module]:
    norms = []
    for attr in attrs:
        m = getattr(module, attr, None)
        if m is None or isinstance(m, nn.Identity):
            continue
        if not sliceable_norm(m, hidden):
            shapes = {n: tuple(t.shape) for n, t in norm_tensors(m)}
            raise DgmrError(f"{path}.{attr}: {type(m).__name__} over the hidden dim is not a per-channel norm of "
                            f"width {hidden} (tensors {shapes or 'none'}); cannot slice it")
        norms.append(m)
    return norms


@register_mlp_kind("timm_glu_packed", builtin=True)
def _timm_glu(path: str, m: nn.Module) -> MlpSite | None:
    """timm GluMlp / SwiGLUPacked: fc1 = [x1; x2] chunked on the last dim, gate_last picks the gate half."""
    up, down = _linear(m, "fc1"), _linear(m, "fc2")
    if up is None or down is None or not hasattr(m, "gate_last") or not hasattr(m, "chunk_dim"):
        return None
    if up.out_features != 2 * down.in_features:
        return None
    return MlpSite(path, m, "timm_glu_packed", up, down, packed="gate_last" if m.gate_last else "gate_first",
                   norms=_hidden_norms(m, ("norm",), down.in_features, path))


@register_mlp_kind("swiglu_split", builtin=True)
def _swiglu_split(path: str, m: nn.Module) -> MlpSite | None:
    """timm SwiGLU (EVA02): fc1_g (gate), fc1_x (up), optional hidden norm, fc2."""
    gate, up, down = _linear(m, "fc1_g"), _linear(m, "fc1_x"), _linear(m, "fc2")
    if gate is None or up is None or down is None:
        return None
    return MlpSite(path, m, "swiglu_split", up, down, gate=gate, norms=_hidden_norms(m, ("norm",), down.in_features, path))


@register_mlp_kind("gate_up_down", builtin=True)
def _gate_up_down(path: str, m: nn.Module) -> MlpSite | None:
    """Hugging Face gated MLPs (Dinov2SwiGLUFFN and LLaMA-style): gate_proj, up_proj, down_proj."""
    gate, up, down = _linear(m, "gate_proj"), _linear(m, "up_proj"), _linear(m, "down_proj")
    if gate is None or up is None or down is None:
        return None
    return MlpSite(path, m, "gate_up_down", up, down, gate=gate)


@register_mlp_kind("fc1_fc2", builtin=True)
def _fc1_fc2(path: str, m: nn.Module) -> MlpSite | None:
    """timm Mlp (ViT, DeiT, DINOv2, Swin, EVA) and HF ViT/CLIP/SigLIP/Dinov2 MLPs: fc1, act, [norm], fc2."""
    up, down = _linear(m, "fc1"), _linear(m, "fc2")
    if up is None or down is None or up.out_features != down.in_features:
        return None
    # grn: timm GlobalResponseNormMlp (ConvNeXt V2), a per-channel GRN over the hidden dim
    return MlpSite(path, m, "fc1_fc2", up, down, norms=_hidden_norms(m, ("norm", "grn"), down.in_features, path))


@register_mlp_kind("conv1x1", builtin=True)
def _conv_mlp(path: str, m: nn.Module) -> MlpSite | None:
    """1x1-conv MLPs on NCHW maps: timm Mlp(use_conv=True) (ConvNeXt with conv_mlp=True,
    MetaFormer/PoolFormer/ConvFormer), ConvMlp, GlobalResponseNormMlp(use_conv=True):
    fc1, act, [norm or grn over the hidden channels], fc2."""
    up, down = _conv1x1(m, "fc1"), _conv1x1(m, "fc2")
    if up is None or down is None or up.out_channels != down.in_channels:
        return None
    # squeeze-excitation (timm SEModule, EffectiveSE...) has fc1/fc2 1x1 convs too, but its output
    # gates the block's input through `gate`: it is no MLP, and its bottleneck is not ours to cut
    if hasattr(m, "gate"):
        return None
    return MlpSite(path, m, "conv1x1", up, down, norms=_hidden_norms(m, ("norm", "grn"), down.in_channels, path))


@register_mlp_kind("open_clip", builtin=True)
def _open_clip(path: str, m: nn.Module) -> MlpSite | None:
    """open_clip ResidualAttentionBlock.mlp: Sequential(c_fc, gelu, [ln], c_proj)."""
    up, down = _linear(m, "c_fc"), _linear(m, "c_proj")
    if up is None or down is None or up.out_features != down.in_features:
        return None
    return MlpSite(path, m, "open_clip", up, down, norms=_hidden_norms(m, ("ln",), down.in_features, path))


GENERIC_NAME = re.compile(r"(mlp|ffn|feed_?forward)", re.I)


def _generic_pair(path: str, m: nn.Module) -> MlpSite | None:
    """Fallback: a module named like an MLP whose only Linear children are d->h then h->d."""
    if not GENERIC_NAME.search(path.rsplit(".", 1)[-1]):
        return None
    linears = [c for c in m.children() if isinstance(c, nn.Linear)]
    if len(linears) != 2:
        return None
    a, b = linears
    if a.out_features != b.in_features or a.in_features != b.out_features:
        return None
    return MlpSite(path, m, "generic", a, b)


def find_mlps(root: nn.Module, exclude: re.Pattern | None = None, prefix: str = "") -> list[MlpSite]:
    """All MLPs under ``root`` (names relative to the model when ``prefix`` is its path).

    Registered kinds are tried first (user kinds before built-ins); the generic
    Linear->act->Linear fallback, which is not a registry entry, only runs when no
    registered kind matched anything. Modules whose path matches ``exclude``
    (pooling heads, say) are skipped with everything below them.
    """
    sites = [site for site, _, _ in find_sites(root, list(MLP_KINDS.values()), _generic_pair, exclude, prefix)]
    if not sites:
        found = [f"{p or '<root>'} ({type(m).__name__}: {sum(isinstance(c, nn.Linear) for c in m.children())} Linear)"
                 for p, m, _, _ in walk(root, prefix) if any(isinstance(c, nn.Linear) for c in m.children())]
        listing = "; ".join(found[:12]) + (f"; ... {len(found) - 12} more" if len(found) > 12 else "")
        raise DgmrError(f"no MLP found in {type(root).__name__} (known kinds: {', '.join(MLP_KINDS)}, generic "
                        f"Linear->act->Linear named mlp/ffn); modules holding Linear layers: {listing or 'none'}")
    return sites


# ---------------------------------------------------------------------------------------
# surgery
def _check_norm(site: MlpSite, norm: nn.Module, k: int) -> None:
    """GroupNorm splits the channels into num_groups equal groups: k must still divide
    (unless every channel is its own group, where the cut keeps that)."""
    groups = getattr(norm, "num_groups", None)
    if isinstance(groups, int) and groups > 1 and k % groups and not per_channel_groups(norm):
        raise DgmrError(f"{site.name}: {type(norm).__name__} over the hidden dim has {groups} groups, which do not "
                        f"divide {k} kept neurons; pick a width that is a multiple of {groups}")


def check_width(site: MlpSite, k: int) -> None:
    """Refuse a width ``k`` that ``site`` cannot be cut to (its hidden norms'), before any cut."""
    for norm in site.norms:
        _check_norm(site, norm, k)


def shrink_mlp(site: MlpSite, keep: torch.Tensor) -> None:
    """Keep hidden neurons ``keep`` (ascending indices) of ``site``, in place.

    Slices the up/gate rows (and biases), every hidden-dim norm and the down columns from
    the ORIGINAL values, on the weights' own device and dtype. Works on ``meta`` tensors
    too, which is how shapes are rebuilt without weights.
    """
    h = site.hidden
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    k = keep.numel()
    if k == 0 or k > h or keep.min() < 0 or keep.max() >= h or torch.unique(keep).numel() != k:
        raise DgmrError(f"{site.name}: invalid kept indices for hidden size {h} (k={k})")
    check_width(site, k)  # before any cut: a refused width leaves the MLP as it was
    if site.packed is not None:
        take_rows(site.up, torch.cat([keep, keep + h]))
    else:
        take_rows(site.up, keep)
    if site.gate is not None:
        take_rows(site.gate, keep)
    for norm in site.norms:
        take_norm(norm, keep)
    take_cols(site.down, keep)
