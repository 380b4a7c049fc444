"""Calibration in one sweep (docs/calibration.md, "Cost"): the blocks run one at a time on
stored hidden states, with the full passes' results, a cost that does not grow with depth,
and a fallback, with its reason, for models whose blocks cannot run so."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import dgmr
from dgmr.models.families import GenericFamily, NoSequentialBlocks, family_of
from dgmr.prune.calibration.settings import CalibrationWarning

from tiny_models import CASES, build

pytestmark = pytest.mark.usefixtures("one_thread")

# the stated tolerance (docs/calibration.md): same kept neurons, weights within this relative
# (Frobenius, per tensor) difference, the same relative errors recorded
WEIGHT_RTOL = 1e-6
ACT, GLOBAL, NO_COMP = dict(criterion="diversity-act"), dict(allocate="global"), dict(compensation=False,
                                                                                      criterion="diversity-act")
# beside diversity + compensation: the activation criterion, global allocation (its statistics
# sweep), no compensation; on a hidden-norm MLP, a GRN and the MLP after SigLIP's blocks
VARIANTS = {"timm_vit": [ACT, GLOBAL], "timm_eva02_swiglu_norm": [ACT], "timm_convnextv2_linear_grn": [NO_COMP],
            "hf_siglip_vision": [GLOBAL]}


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


def _images(size: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prune(model: nn.Module, x: torch.Tensor, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # few tokens for a tiny model's width
        return dgmr.prune(copy.deepcopy(model), calibration=x, progress=False, **kw)


def assert_same_prune(a, rec_a, b, rec_b) -> None:
    assert rec_a.kept.keys() == rec_b.kept.keys()
    for name in rec_a.kept:
        assert torch.equal(rec_a.kept[name], rec_b.kept[name]), name
    sb = b.state_dict()
    for name, t in a.state_dict().items():
        if t.is_floating_point():
            diff = float((t.double() - sb[name].double()).norm() / (sb[name].double().norm() + 1e-30))
            assert diff <= WEIGHT_RTOL, (name, diff)
    for la, lb in zip(rec_a.layers, rec_b.layers):
        assert la.keys() == lb.keys()
        for key in {"rel_err_before", "rel_err_after", "refit", "tokens", "rel_err_estimate"} & la.keys():
            assert la[key] == pytest.approx(lb[key], rel=1e-9, abs=1e-12), (la["name"], key)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_sweep_gives_the_full_passes_results_on_every_layout(case, cfgdir):
    model, _ = build(case, cfgdir)
    fam = family_of(model)
    if case.family != "generic":  # the family names blocks that hold the tower's MLPs (SigLIP's head runs after them)
        inside = {id(m) for _, block in fam.sequential_blocks(model) for m in block.modules()}
        outside = [s.name for s in fam.mlps(model) if id(s.module) not in inside]
        assert outside == (["head.mlp"] if case.id == "hf_siglip_vision" else [])
    small = case.image_size <= 64
    x = _images(case.image_size, 11 if small else 1)
    kw = dict(calibration_batch_size=4 if small else 1, **(dict(hidden=64) if case.id == "hf_dinov2_swiglu"
                                                            else dict(mlp_ratio=1.0)))
    for variant in [{}] + VARIANTS.get(case.id, []):
        a, rec_a = _prune(model, x, **kw, **variant)
        b, rec_b = _prune(model, x, **kw, **variant, calibration_sweep=False)
        assert rec_a.calibration["passes"] == ("full" if case.family == "generic" else "sweep")
        assert rec_b.calibration["passes"] == "full" and "fallback" not in rec_b.calibration
        assert_same_prune(a, rec_a, b, rec_b)


def _counting(modules: list[nn.Module]) -> tuple[list[int], list]:
    calls = [0] * len(modules)

    def hook(i: int):
        def count(*_):
            calls[i] += 1
        return count

    return calls, [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]


def test_each_block_runs_a_fixed_number_of_times_whatever_the_depth():
    import timm

    x = _images(32, 8)
    for depth in (2, 5):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                  depth=depth).eval()
        runs = {}
        for sweep in (True, False):
            m = copy.deepcopy(model)
            blocks, h1 = _counting(list(m.blocks))
            attn, h2 = _counting([b.attn.qkv for b in m.blocks])  # what the attention computes
            _prune(m, x, mlp_ratio=1.0, calibration_batch_size=4, calibration_sweep=sweep)
            for h in h1 + h2:
                h.remove()
            runs[sweep] = blocks, attn
        blocks, attn = runs[True]
        # 2 batches: the first pass, the pass to the MLP, the pass making the next block's
        # inputs (none after the last block); attention runs twice, its output kept for the third
        assert blocks == [6] * (depth - 1) + [4]
        assert attn == [4] * depth
        # full passes reach block j once per MLP from j on, besides the first pass
        assert runs[False][0] == [2 * (1 + depth - j) for j in range(depth)]


class _Block(nn.Module):
    def __init__(self, d: int, h: int, inplace: bool = False, scaled_attention: bool = False):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        self.inplace, self.scaled_attention = inplace, scaled_attention

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        given = x
        a = self.attn(x)
        if self.scaled_attention:  # changes the attention output in place after it ran (an in-place layer scale)
            a.mul_(0.5)
        x = x + a * (1.0 if scale is None else scale)
        y = x + self.mlp(self.norm(x))
        if self.inplace:
            given.mul_(1.0)
        return y


class _Chained(nn.Module):
    """A model of no library whose blocks have a forward of their own (the generic family's
    guess), with the ways a forward can break the chain."""

    def __init__(self, depth: int = 3, between: bool = False, inplace: bool = False, mlp_first: bool = False,
                 scaled_attention: bool = False):
        super().__init__()
        d, h = 16, 48
        self.embed = nn.Linear(3 * 8 * 8, d)
        mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        self.pre = nn.ModuleDict({"mlp": mlp}) if mlp_first else None
        self.blocks = nn.ModuleList(_Block(d, h, inplace, scaled_attention) for _ in range(depth))
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(nn.functional.unfold(x, 8, stride=8).transpose(1, 2))
        if self.pre is not None:
            x = x + self.pre["mlp"](x)
        scale = x.new_tensor(0.9)  # a keyword argument, the same for every block
        for b in self.blocks:
            x = b(x, scale=scale)
            if self.between:
                x = x * 1.0
        return x


def test_a_model_of_no_library_walks_its_blocks_with_their_keyword_arguments():
    torch.manual_seed(0)
    x = _images(16, 12)
    for model in (_Chained().eval(), _Chained(scaled_attention=True).eval()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", CalibrationWarning)  # no fallback
            a, rec_a = _prune(model, x, hidden=12, calibration_batch_size=5)
        b, rec_b = _prune(model, x, hidden=12, calibration_batch_size=5, calibration_sweep=False)
        assert rec_a.calibration["passes"] == "sweep"
        assert_same_prune(a, rec_a, b, rec_b)


class _Unchained(GenericFamily):
    def sequential_blocks(self, model):
        raise NoSequentialBlocks("its blocks share a cache")


@pytest.mark.parametrize("model, family, why", [
    (_Chained(between=True), None, "blocks.1 does not run on what blocks.0 returned"),
    (_Chained(inplace=True), None, "blocks.0 changes its input in place"),
    (_Chained(mlp_first=True), None, "pre.mlp runs before the blocks"),
    (_Chained(), _Unchained(), "its blocks share a cache"),
], ids=["between", "inplace", "mlp-first", "family"])
def test_models_whose_blocks_cannot_run_alone_fall_back_to_full_passes_and_say_why(model, family, why):
    torch.manual_seed(0)
    model.eval()
    x = _images(16, 8)
    with pytest.warns(CalibrationWarning, match=f"calibration runs full forward passes.*{why}"):
        a, rec_a = dgmr.prune(copy.deepcopy(model), hidden=12, calibration=x, progress=False, family=family)
    assert rec_a.calibration["passes"] == "full" and why in rec_a.calibration["fallback"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # asked for full passes: nothing to warn about
        b, rec_b = dgmr.prune(copy.deepcopy(model), hidden=12, calibration=x, progress=False, family=family,
                              calibration_sweep=False)
    assert_same_prune(a, rec_a, b, rec_b)


def test_the_sweeps_first_pass_refuses_before_any_cut():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    with torch.no_grad():
        model.blocks[1].norm2.weight[0] = float("nan")
    with pytest.raises(dgmr.DgmrError, match="blocks.1.mlp: non-finite activations.*nothing was cut"):
        dgmr.prune(model, mlp_ratio=1.0, calibration=_images(32, 4), progress=False)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [768, 768]


@pytest.mark.cuda
def test_the_sweep_on_the_gpu_matches_full_passes_there():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
    x = _images(32, 16)
    a, rec_a = _prune(model, x, mlp_ratio=1.0, calibration_device="cuda", calibration_batch_size=8)
    b, rec_b = _prune(model, x, mlp_ratio=1.0, calibration_device="cuda", calibration_batch_size=8,
                      calibration_sweep=False)
    assert rec_a.calibration["passes"] == "sweep" and rec_a.calibration["precision"] == "bf16"
    for name in rec_a.kept:
        assert torch.equal(rec_a.kept[name], rec_b.kept[name]), name
    with torch.no_grad():  # bf16 kernels may differ between a block alone and inside the model: close, not equal
        ya, yb = a(x), b(x)
    assert float((ya - yb).norm() / yb.norm()) < 1e-2
