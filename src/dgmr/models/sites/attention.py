"""Where the attention layers are, and the one surgery routine that removes whole heads.

An attention "kind" says how one library lays out a multi-head attention module: which
tensors hold the q, k and v rows of every head (one fused ``qkv`` projection, separate
projections, biases the module keeps itself), which projection reads the attention output
(its columns are the heads' channels), which norms run over the attention width, which
tensors are indexed by head (Swin's and BEiT's relative position bias tables), and which of
the module's attributes hold its head count and attention width. Kinds are registered with
:func:`register_attention_kind` (a user's first, then the built-ins; a generic fallback
after all of them); :func:`find_attention` walks a module tree and returns one
:class:`AttentionSite` per attention layer. :func:`shrink_heads` is the only code that cuts
heads. Norms over the head dim (qk-norm, shared by every head) and rotary tables shared by
the heads stay as they are.

Heads keep their head dim: a layer of ``h`` heads of ``hd`` cut to ``k`` heads has an
attention width of ``k * hd``. Where the library's own forward cannot run at a width other
than the embedding's (timm's EvaAttention and BEiT Attention reshape to the input width;
``nn.MultiheadAttention`` ties its heads to its embed dim), the kind names a ``rebuild``
(:mod:`.head_modules`) that gives the cut module a forward that can.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ...core.errors import DgmrError
from ...core.registry import Registry
from .head_modules import HeadAttention, head_attention_from, retype_beit, retype_eva
from .slicing import norm_tensors, sliceable_norm, take, take_cols, take_norm
from .walk import find_sites

# a row tensor's layout: which blocks of the attention width it stacks along dim 0 (q, k, v,
# g for a gate): "qkv" for a fused projection, "q" for a q projection or a q bias alone
Rows = tuple[nn.Module, str, str]


@dataclass
class AttentionSite:
    """One multi-head attention layer of a model.

    ``rows``: (owner module, tensor name, layout) of every tensor whose dim 0 stacks
    ``len(layout)`` blocks of the attention width (``heads * head_dim``), head after head:
    weights and biases of q, k, v (and a gate). ``proj`` reads the attention output (its
    columns are the width). ``norms`` normalise over the width; ``tables`` are
    (owner, tensor name, dim) of tensors with one entry per head along ``dim``.
    ``head_attrs`` / ``width_attrs`` are the module's attributes holding its head count /
    attention width, set after a cut. ``rebuild`` returns the module that replaces the cut
    one (itself, re-typed, or a new module), when the library's forward needs it;
    ``refuse`` says why heads cannot be cut here (grouped-query attention, tables shared
    across layers), checked before any cut.
    """

    name: str
    module: nn.Module
    kind: str
    heads: int
    head_dim: int
    proj: nn.Linear
    rows: list[Rows]
    norms: list[nn.Module] = field(default_factory=list)
    tables: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    head_attrs: tuple[str, ...] = ("num_heads",)
    width_attrs: tuple[str, ...] = ()
    rebuild: Callable[[nn.Module], nn.Module] | None = None
    refuse: str | None = None
    # a module with the same forward whose output projection runs as a module, for layers whose
    # library forward reads the projection's weights instead (calibration hooks must see it run)
    hookable: Callable[[nn.Module], nn.Module] | None = None
    parent: nn.Module | None = field(default=None, repr=False)  # set by find_attention: where the module sits
    attr: str = ""

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def in_features(self) -> int:
        return self.proj.out_features

    @property
    def down(self) -> nn.Linear:
        """The output projection, under the name an MLP site gives the projection that reads its
        hidden layer: what calibration refits, so its moments and refit serve both site kinds."""
        return self.proj

    @property
    def parts(self) -> list[nn.Module]:
        """The modules whose parameters are the layer's (q, k, v, gate, proj, width norms)."""
        owners: list[nn.Module] = []
        for m in [*(o for o, _, _ in self.rows), self.proj, *self.norms, *(o for o, _, _ in self.tables)]:
            if not any(m is o for o in owners):
                owners.append(m)
        return owners

    def tensors(self) -> list[tuple[nn.Module, str]]:
        """(owner, name) of every tensor :func:`shrink_heads` cuts, in a fixed order."""
        out = [(o, n) for o, n, _ in self.rows] + [(self.proj, "weight")]
        out += [(norm, n) for norm in self.norms for n, _ in norm_tensors(norm)]
        return out + [(o, n) for o, n, _ in self.tables]

    def scoring_blocks(self) -> torch.Tensor:
        """(heads, head_dim, F): head j's rows, row i the concatenation of channel i's q, k, v
        (and gate) weight rows, as the gated MLP's neuron owns [gate_j, up_j]. Biases are not scored."""
        parts = []
        for owner, name, layout in self.rows:
            t = getattr(owner, name)
            if t.ndim != 2:
                continue
            b = len(layout)
            parts.append(t.detach().reshape(b, self.heads, self.head_dim, -1).permute(1, 2, 0, 3)
                         .reshape(self.heads, self.head_dim, -1))
        return torch.cat(parts, dim=2)


# ---------------------------------------------------------------------------------------
# kinds registry
AttentionKind = Callable[[str, nn.Module], "AttentionSite | None"]
ATTENTION_KINDS: Registry[AttentionKind] = Registry("attention kind")


def register_attention_kind(name: str, *, replace: bool = False,
                            builtin: bool = False) -> Callable[[AttentionKind], AttentionKind]:
    """Register ``fn(path, module) -> AttentionSite | None``. Kinds a user registers are tried
    before the built-ins; an existing name is refused unless ``replace=True``."""
    return ATTENTION_KINDS.decorator(name, replace=replace, builtin=builtin)


def _class(module: str, name: str) -> type | None:
    """``module.name`` if a library already imported that module (no import paid to detect)."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _is(m: nn.Module, module: str, name: str) -> bool:
    cls = _class(module, name)
    return cls is not None and isinstance(m, cls)


def _linear(module: nn.Module, attr: str) -> nn.Linear | None:
    m = getattr(module, attr, None)
    return m if isinstance(m, nn.Linear) else None


def _rows_of(proj: nn.Linear | None, layout: str) -> list[Rows]:
    if proj is None:
        return []
    return [(proj, "weight", layout)] + ([(proj, "bias", layout)] if proj.bias is not None else [])


def _width_norms(m: nn.Module, attrs: tuple[str, ...], width: int, path: str) -> list[nn.Module]:
    norms = []
    for attr in attrs:
        n = getattr(m, attr, None)
        if n is None or isinstance(n, nn.Identity):
            continue
        if not sliceable_norm(n, width):
            raise DgmrError(f"{path}.{attr}: {type(n).__name__} over the attention width is not a per-channel norm "
                            f"of width {width}; cannot cut heads through it")
        norms.append(n)
    return norms


def _qkv_rows(m: nn.Module, width: int) -> list[Rows] | None:
    """A fused ``qkv`` (3 x width rows) or separate ``q_proj``/``k_proj``/``v_proj``, with
    q/k/v biases the module may keep itself (EVA, BEiT: ``q_bias``, ``k_bias``, ``v_bias``)."""
    qkv = _linear(m, "qkv")
    if qkv is not None:
        if qkv.out_features != 3 * width:
            return None
        rows = _rows_of(qkv, "qkv")
    else:
        projs = [_linear(m, a) for a in ("q_proj", "k_proj", "v_proj")]
        if any(p is None or p.out_features != width for p in projs):
            return None
        rows = [r for p, x in zip(projs, "qkv") for r in _rows_of(p, x)]
    for x in "qkv":
        t = getattr(m, f"{x}_bias", None)
        if isinstance(t, torch.Tensor):
            rows.append((m, f"{x}_bias", x))
    return rows


def _site(path: str, m: nn.Module, kind: str, heads: int, head_dim: int, **kw) -> AttentionSite | None:
    """A site of a module with a ``qkv`` or q/k/v projections and ``proj`` (or as named)."""
    width = heads * head_dim
    proj = kw.pop("proj", None) or _linear(m, "proj")
    rows = _qkv_rows(m, width)
    if proj is None or rows is None or proj.in_features != width:
        return None
    gate = _linear(m, "gate")
    rows += _rows_of(gate, "g") if gate is not None and gate.out_features == width else []
    return AttentionSite(path, m, kind, heads, head_dim, proj, rows, **kw)


@register_attention_kind("timm_attention", builtin=True)
def _timm_attention(path: str, m: nn.Module) -> AttentionSite | None:
    """timm ``Attention`` (ViT, DeiT, DINOv2, ...: fused qkv, qk-norm, scale norm, gate) and
    ``AttentionRope`` (fused or separate q/k/v; grouped-query attention is refused)."""
    rope = _is(m, "timm.layers.attention", "AttentionRope")
    if not (rope or _is(m, "timm.layers.attention", "Attention")):
        return None
    heads, hd = m.num_heads, m.head_dim
    kv = getattr(m, "num_kv_heads", heads)
    refuse = (f"grouped-query attention ({heads} query heads share {kv} key/value heads): dgmr cannot cut it"
              if kv != heads else None)
    if refuse:  # k and v hold fewer rows: describe q alone, enough to refuse before any cut
        return AttentionSite(path, m, "timm_attention", heads, hd, m.proj, [], refuse=refuse)
    return _site(path, m, "timm_attention", heads, hd, norms=_width_norms(m, ("norm",), heads * hd, path),
                 head_attrs=("num_heads", "num_kv_heads") if rope else ("num_heads",),
                 width_attrs=("attn_dim", "kv_dim") if rope else ("attn_dim",))


@register_attention_kind("timm_eva", builtin=True)
def _timm_eva(path: str, m: nn.Module) -> AttentionSite | None:
    """timm ``EvaAttention`` (EVA02, EVA-CLIP trunks): fused qkv with q/v biases (k bias a zero
    buffer) or separate q/k/v, rope (shared by the heads), inner norm, gate."""
    if not _is(m, "timm.models.eva", "EvaAttention"):
        return None
    heads, hd = m.num_heads, m.head_dim
    return _site(path, m, "timm_eva", heads, hd, norms=_width_norms(m, ("norm",), heads * hd, path),
                 rebuild=retype_eva)


@register_attention_kind("timm_beit", builtin=True)
def _timm_beit(path: str, m: nn.Module) -> AttentionSite | None:
    """timm BEiT ``Attention``: fused qkv, q/v biases, a relative position bias table per layer."""
    if not _is(m, "timm.models.beit", "Attention"):
        return None
    heads = m.num_heads
    hd = m.proj.in_features // heads
    tables = [(m, "relative_position_bias_table", 1)] if m.relative_position_bias_table is not None else []
    return _site(path, m, "timm_beit", heads, hd, tables=tables, rebuild=retype_beit)


@register_attention_kind("timm_window", builtin=True)
def _timm_window(path: str, m: nn.Module) -> AttentionSite | None:
    """timm Swin ``WindowAttention``: fused qkv, a relative position bias table (one column per head)."""
    if not _is(m, "timm.models.swin_transformer", "WindowAttention"):
        return None
    heads = m.num_heads
    return _site(path, m, "timm_window", heads, m.proj.in_features // heads,
                 tables=[(m, "relative_position_bias_table", 1)])


def _packed(path: str, m: nn.Module, kind: str, rebuild: Callable | None) -> AttentionSite:
    """A packed ``in_proj_weight`` (3 x width rows), ``in_proj_bias``, ``out_proj``."""
    rows: list[Rows] = [(m, "in_proj_weight", "qkv")]
    if m.in_proj_bias is not None:
        rows.append((m, "in_proj_bias", "qkv"))
    return AttentionSite(path, m, kind, m.num_heads, m.head_dim, m.out_proj, rows, rebuild=rebuild)


@register_attention_kind("torch_mha", builtin=True)
def _torch_mha(path: str, m: nn.Module) -> AttentionSite | None:
    """``nn.MultiheadAttention`` with a packed in_proj (open_clip's ViT blocks): it ties its heads
    to its embed dim, so a cut one becomes a :class:`~.head_modules.HeadAttention`."""
    if not isinstance(m, nn.MultiheadAttention):
        return None
    site = _packed(path, m, "torch_mha", head_attention_from)
    site.hookable = head_attention_from  # its forward calls out_proj's weights, never the module
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        site.refuse = ("nn.MultiheadAttention with separate key/value dims, add_bias_kv or add_zero_attn: "
                       "dgmr cannot cut its heads")
    return site


@register_attention_kind("dgmr_heads", builtin=True)
def _dgmr_heads(path: str, m: nn.Module) -> AttentionSite | None:
    """dgmr's :class:`~.head_modules.HeadAttention` (a cut ``nn.MultiheadAttention``)."""
    return _packed(path, m, "dgmr_heads", None) if isinstance(m, HeadAttention) else None


@register_attention_kind("hf_qkv", builtin=True)
def _hf_qkv(path: str, m: nn.Module) -> AttentionSite | None:
    """Hugging Face vision attention with separate q/k/v (ViT, DINOv2: ``o_proj``; CLIP, SigLIP:
    ``out_proj``), whose forward takes its head count from the tensors."""
    if not type(m).__module__.startswith("transformers."):
        return None
    attr = next((a for a in ("num_heads", "num_attention_heads") if isinstance(getattr(m, a, None), int)), None)
    proj = _linear(m, "o_proj") or _linear(m, "out_proj")
    q, k = _linear(m, "q_proj"), _linear(m, "k_proj")
    if attr is None or proj is None or q is None or k is None or not isinstance(getattr(m, "head_dim", None), int):
        return None
    heads, hd = getattr(m, attr), m.head_dim
    if k.out_features != q.out_features:
        return AttentionSite(path, m, "hf_qkv", heads, hd, proj, [], refuse=(
            f"grouped-query attention ({q.out_features // hd} query heads, {k.out_features // hd} key/value "
            "heads): dgmr cannot cut it"))
    return _site(path, m, "hf_qkv", heads, hd, proj=proj, head_attrs=(attr,))


GENERIC_NAME = re.compile(r"(attn|attention)$", re.I)


def _generic(path: str, m: nn.Module) -> AttentionSite | None:
    """Fallback: a module named like attention with ``num_heads``, a fused ``qkv`` or separate
    q/k/v projections and an output projection (``proj``, ``o_proj`` or ``out_proj``), whose
    forward reads its head count from ``num_heads`` (and its width from the tensors or from an
    ``attn_dim``/``all_head_dim``/``inner_dim`` attribute, updated too)."""
    if not GENERIC_NAME.search(path.rsplit(".", 1)[-1]) or not isinstance(getattr(m, "num_heads", None), int):
        return None
    proj = _linear(m, "proj") or _linear(m, "o_proj") or _linear(m, "out_proj")
    heads = m.num_heads
    if proj is None or heads < 1 or proj.in_features % heads:
        return None
    hd = proj.in_features // heads
    width_attrs = tuple(a for a in ("attn_dim", "all_head_dim", "inner_dim") if getattr(m, a, None) == heads * hd)
    return _site(path, m, "generic", heads, hd, proj=proj, width_attrs=width_attrs)


def find_attention(root: nn.Module, exclude: re.Pattern | None = None, prefix: str = "") -> list[AttentionSite]:
    """All attention layers under ``root`` (names relative to the model when ``prefix`` is
    its path); [] when there is none. Registered kinds first (a user's before the built-ins);
    the generic fallback, not a registry entry, only when no registered kind matched anything.
    Modules whose path matches ``exclude`` (pooling heads) are skipped with everything below."""
    sites = []
    for site, parent, attr in find_sites(root, list(ATTENTION_KINDS.values()), _generic, exclude, prefix):
        site.parent, site.attr = parent, attr
        sites.append(site)
    return sites


# ---------------------------------------------------------------------------------------
# surgery
def check_heads(site: AttentionSite, k: int) -> None:
    """Refuse keeping ``k`` heads of ``site`` before any cut: out of range, or a layout dgmr cannot cut."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= site.heads:
        raise DgmrError(f"{site.name}: cannot keep {k} of {site.heads} attention heads (need 1 <= heads <= "
                        f"{site.heads})")
    if site.refuse and k != site.heads:
        raise DgmrError(f"{site.name}: {site.refuse}")


def head_channels(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The attention-width channels of heads ``keep``: head j owns ``j*head_dim ... + head_dim - 1``."""
    return (keep[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def shrink_heads(site: AttentionSite, keep: torch.Tensor) -> nn.Module:
    """Keep heads ``keep`` (ascending indices) of ``site``, in place; returns the module now in
    the site's place (the same one, or its ``rebuild``).

    Slices the q, k, v (and gate) rows and biases of the kept heads, the output projection's
    columns, every width norm and per-head table from the ORIGINAL values, on the tensors' own
    device and dtype (``meta`` too: that is how :func:`dgmr.load` rebuilds shapes), and sets
    the module's head count and attention width."""
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    k = keep.numel()
    h, hd = site.heads, site.head_dim
    if k == 0 or k > h or keep.min() < 0 or keep.max() >= h or torch.unique(keep).numel() != k:
        raise DgmrError(f"{site.name}: invalid kept head indices for {h} heads (k={k})")
    check_heads(site, k)  # before any cut: a refused layout leaves the layer as it was
    cols = head_channels(keep, hd)
    for owner, name, layout in site.rows:
        take(owner, name, torch.cat([cols + b * site.width for b in range(len(layout))]))
        if isinstance(owner, nn.Linear) and name == "weight":
            owner.out_features = owner.weight.shape[0]
    take_cols(site.proj, cols)
    for norm in site.norms:
        take_norm(norm, cols)
    for owner, name, dim in site.tables:
        take(owner, name, keep, dim)
    for attr in site.head_attrs:
        setattr(site.module, attr, k)
    for attr in site.width_attrs:
        setattr(site.module, attr, k * hd)
    site.heads = k
    if site.rebuild is not None:
        new = site.rebuild(site.module)
        if new is not site.module:
            if site.parent is None:
                raise DgmrError(f"{site.name}: the cut module must be replaced, but it has no parent module")
            setattr(site.parent, site.attr, new)
            site.module = new
    return site.module

