"""Calibrated head removal (the output projection refitted, diversity-act for heads) and one
parameter budget across MLP neurons and attention heads (params_fraction): docs/heads.md."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import dgmr
from dgmr.models.artifact import read_config
from dgmr.models.families import family_of
from dgmr.models.sites.attention import find_attention
from dgmr.prune.calibration.allocate import head_cost
from dgmr.prune.calibration.heads import head_activations
from dgmr.prune.calibration.moments import Moments
from dgmr.prune.head_criteria import diversity_act

from helpers import TINY_VIT_ARGV, image_folder
from tiny_models import CASES, HEAD_CASES, GenericAttnNet, build, output

ATTENTION_CASES = [c for c in CASES if c.attention] + HEAD_CASES


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


def _images(size: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_calibrated_heads_every_library(case, cfgdir, tmp_path):
    """Every attention kind: the refit never raises a layer's error, the calibrated cut is
    closer to the original than the same cut without calibration, and it saves and loads."""
    model, src = build(case, cfgdir)
    fam = family_of(model)
    x = _images(case.image_size, 12)
    with torch.no_grad():
        ref = output(fam, model, x)
    plain, _ = dgmr.prune(copy.deepcopy(model), head_fraction=0.5, progress=False, source=src)
    cut, rec = dgmr.prune(model, head_fraction=0.5, calibration=x, progress=False, source=src)
    assert [layer["heads_after"] for layer in rec.heads] == [layer["heads_after"] for layer in plain_heads(plain)]
    for layer in rec.heads:
        assert layer["rel_err_after"] <= layer["rel_err_before"] * (1 + 1e-9) + 1e-12, layer
    with torch.no_grad():
        y = output(fam, cut, x)
        if any(layer["heads_after"] < layer["heads_before"] for layer in rec.heads):
            assert _rel(y, ref) < _rel(output(fam, plain, x), ref)
    # a layer that kept every head keeps its library's own module (open_clip: nn.MultiheadAttention)
    for site, layer in zip(fam.attention(cut), rec.heads):
        if layer["heads_after"] == layer["heads_before"]:
            assert site.kind == fam.attention(build(case, cfgdir)[0])[0].kind
    out = tmp_path / "cut"
    dgmr.save(cut, out, source=src, record=rec)
    with torch.no_grad():
        again = dgmr.load(out, model=GenericAttnNet() if src is None else None)
        torch.testing.assert_close(output(fam, again, x), y, rtol=0, atol=0)


def plain_heads(model: nn.Module) -> list[dict]:
    return [{"heads_after": s.heads} for s in family_of(model).attention(model)]


@pytest.mark.parametrize("case_id", ["timm_vit_qk_scale_norm", "open_clip_vit", "hf_clip_vision",
                                     "timm_eva02_split_inner_norm"])
def test_the_sweep_gives_the_full_passes_results_with_heads(case_id, cfgdir):
    case = next(c for c in ATTENTION_CASES if c.id == case_id)
    model, src = build(case, cfgdir)
    x = _images(case.image_size, 8)
    kw = dict(head_fraction=0.5, keep_fraction=0.5, calibration=x, progress=False, source=src,
              criterion="diversity-act")
    a, rec_a = dgmr.prune(copy.deepcopy(model), **kw)
    b, rec_b = dgmr.prune(copy.deepcopy(model), calibration_sweep=False, **kw)
    assert rec_a.calibration["passes"] == "sweep" and rec_b.calibration["passes"] == "full"
    assert all(torch.equal(la["kept"], lb["kept"]) for la, lb in zip(rec_a.heads + rec_a.layers,
                                                                    rec_b.heads + rec_b.layers))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            assert float((sa[k] - sb[k]).norm()) <= 1e-6 * max(float(sb[k].norm()), 1e-12), k


def test_the_refit_is_the_ridge_least_squares_solution():
    """Block 0's output projection after a calibrated heads cut, against numpy's least squares
    on the stacked ridge system, from the tokens themselves."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0).eval()
    x = _images(32, 12)  # 204 tokens for 129 coefficients: the solve is determined
    attn = model.blocks[0].attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [attn.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
             attn.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    ridge = 1e-3
    cut, rec = dgmr.prune(copy.deepcopy(model), heads=2, calibration=x, ridge=ridge, progress=False)
    keep = rec.heads[0]["kept"]
    new = cut.blocks[0].attn
    ctx: list[torch.Tensor] = []
    hook = new.proj.register_forward_pre_hook(lambda m, a: ctx.append(a[0]))
    with torch.no_grad():
        new(seen["in"])
    hook.remove()
    a = torch.cat([ctx[0].reshape(-1, 128), torch.ones(ctx[0].shape[0] * ctx[0].shape[1], 1)], 1).double().numpy()
    y = seen["out"].reshape(-1, 192).double().numpy()
    cols = (keep[:, None] * 64 + torch.arange(64)).reshape(-1)
    w0 = torch.cat([attn.proj.weight.detach()[:, cols].T, attn.proj.bias.detach()[None]]).double().numpy()
    lam = ridge * float(np.mean(np.sum(a[:, :128] ** 2, 0)))
    big = np.vstack([a, np.sqrt(lam) * np.eye(129)])
    want = np.linalg.lstsq(big, np.vstack([y, np.sqrt(lam) * w0]), rcond=None)[0]
    got = torch.cat([new.proj.weight.detach().T, new.proj.bias.detach()[None]]).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_diversity_act_is_the_greedy_on_head_contributions():
    """A textbook loop: pick next the head whose contribution through the output projection,
    minus its projection on the kept heads' channels, is largest (tokens as rows)."""
    from timm.layers import Attention

    torch.manual_seed(3)
    module = Attention(48, num_heads=6)
    site = find_attention(nn.ModuleDict({"attn": module}))[0]
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(400, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g, dtype=torch.float64)
    ctx[:, 8:16] = ctx[:, :8] * 0.9 + 0.1 * ctx[:, 8:16]  # head 1 nearly repeats head 0
    mom = Moments("attn", True)
    mom.add(ctx, ctx @ module.proj.weight.detach().double().T)
    picked = diversity_act(head_activations(mom.check(), site, 1e-14), 6).tolist()
    w = module.proj.weight.detach().double()
    kept: list[int] = []
    for _ in range(6):
        basis = ctx[:, [c for j in kept for c in range(8 * j, 8 * j + 8)]]

        def residual(j: int, basis: torch.Tensor = basis) -> float:
            out = ctx[:, 8 * j:8 * j + 8] @ w[:, 8 * j:8 * j + 8].T
            if kept:
                out = out - basis @ torch.linalg.lstsq(basis, out).solution
            return float(out.norm())

        kept.append(max((j for j in range(6) if j not in kept), key=residual))
    assert picked == kept
    assert picked.index(1) > picked.index(0) or picked.index(0) > picked.index(1)  # never both first two
    assert {picked[0], picked[1]} != {0, 1}


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_head_cost_is_what_a_cut_removes(case, cfgdir):
    model, src = build(case, cfgdir)
    fam = family_of(model)
    sites = fam.attention(model)
    before = sum(p.numel() for p in model.parameters())
    cost = sum(head_cost(s) for s in sites if s.heads > 1)
    dgmr.prune(model, heads={s.name: s.heads - 1 for s in sites if s.heads > 1}, progress=False, source=src)
    assert before - sum(p.numel() for p in model.parameters()) == pytest.approx(cost, abs=1e-6)


def test_params_fraction_spends_one_budget_across_mlps_and_heads():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=0).eval()
    fam = family_of(model)
    total = fam.vision_params(model)
    x = _images(32, 16)
    cut, rec = dgmr.prune(model, params_fraction=0.4, calibration=x, allocate="global", progress=False)
    after = fam.vision_params(cut)
    unit = max(head_cost(s) for s in fam.attention(cut))
    assert after <= 0.4 * total and after >= 0.4 * total - 2 * unit
    assert rec.request["params_fraction"] == 0.4 and rec.calibration["params_target"] == round(0.4 * total)
    assert all("rel_err_estimate" in layer for layer in rec.layers + rec.heads)
    # widths given beside it stay as given, and it sizes the rest
    fixed, rec2 = dgmr.prune(copy.deepcopy(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                                            depth=3, num_classes=0)), heads=2, params_fraction=0.4,
                             calibration=x, allocate="global", progress=False)
    assert [layer["heads_after"] for layer in rec2.heads] == [2, 2, 2]
    assert fam.vision_params(fixed) <= 0.4 * total


def test_cli_params_fraction_end_to_end(cli, tmp_path):
    data = tmp_path / "unlabeled"
    image_folder(data, ["a", "b"], per_class=4, size=lambda i: (36, 36), style="noise")
    out = tmp_path / "budget"
    code, stdout, err = cli("prune", *TINY_VIT_ARGV, "--params-fraction", "0.45", "--calibration", data,
                            "--allocate", "global", "--criterion", "diversity-act", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["params_after"] <= 0.45 * summary["params_before"]
    assert "heads_rel_err_after" in summary["calibration"] or summary["heads_after"] == [3]
    cfg = read_config(out)
    assert cfg["prune"]["params_fraction"] == 0.45 and cfg["prune"]["calibration"]["params_target"]
    again = dgmr.load(out)
    assert family_of(again).vision_params(again) == summary["params_after"]
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--params-fraction", "0.45", "--out", tmp_path / "no")
    assert code == 2 and err.startswith("dgmr: error:") and err.count("\n") == 1 and "calibration" in err
    assert not (tmp_path / "no").exists()
