"""Calibrated pruning (docs/calibration.md): compensation, the activation criterion, global allocation."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import dgmr
from dgmr.models.families import family_of
from dgmr.prune.calibration.allocate import bounds, compensated_curve, dropped_curve, spend
from dgmr.prune.calibration.moments import Moments
from dgmr.prune.calibration.settings import CalibrationWarning
from dgmr.models.sites.mlp import matrix

from helpers import TINY_VIT_ARGV, image_folder
from tiny_models import CASES, GenericNet, build, output

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _images(size: int, n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    return tmp_path_factory.mktemp("configs")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_layout_calibrates_reproduces_at_full_width_and_reloads(case, cfgdir, tmp_path):
    model, src = build(case, cfgdir)
    fam = family_of(model)
    x = _images(case.image_size, n=12 if case.image_size <= 64 else 2)  # 2 x 257 tokens at 224 px
    with torch.no_grad():
        y0 = output(fam, model, x)
        full, rec = dgmr.prune(copy.deepcopy(model), keep_fraction=1.0, calibration=x, progress=False, source=src)
        # nothing cut: the original MLP is its own fit, left exactly as it was
        torch.testing.assert_close(output(fam, full, x), y0, rtol=0, atol=0)
        assert all(layer["rel_err_after"] == 0 and not layer["refit"] for layer in rec.layers)

        width = dict(hidden=64) if case.id == "hf_dinov2_swiglu" else dict(mlp_ratio=1.0)
        model, rec = dgmr.prune(model, **width, calibration=x, progress=False, source=src)
        # the refit only improves on the kept original weights (which are one candidate solution)
        assert all(layer["rel_err_after"] < layer["rel_err_before"] for layer in rec.layers)
        cfg = dgmr.save(model, tmp_path / "pruned", source=src, record=rec)
        assert cfg["prune"]["calibration"]["images"] == len(x) and cfg["prune"]["calibration"]["compensate"]
        again = dgmr.load(tmp_path / "pruned", model=GenericNet() if src is None else None)
        for name, t in model.state_dict().items():
            assert torch.equal(again.state_dict()[name], t), name
        # same weights; a conv kernel may still round differently on differently aligned memory
        torch.testing.assert_close(output(fam, again, x), output(fam, model, x))


class _LinearBlocks(nn.Module):
    """Patch tokens through MLPs with an identity activation (and a hidden norm option)."""

    def __init__(self, d: int = 8, h: int = 24, depth: int = 2, act: nn.Module | None = None):
        super().__init__()
        self.embed = nn.Linear(3 * 4 * 4, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": nn.Sequential(
            nn.Linear(d, h, bias=False), act or nn.Identity(), nn.Linear(h, d))}) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(nn.functional.unfold(x, 4, stride=4).transpose(1, 2))
        for b in self.blocks:
            x = x + b["mlp"](x)
        return x


def test_compensation_is_exact_when_dropped_neurons_are_combinations_of_kept_ones():
    torch.manual_seed(0)
    model = _LinearBlocks().eval()
    x = _images(16, n=16)
    # hidden = W1 x with rank(W1) = d = 8: every dropped neuron is a combination of the 8 kept
    with torch.no_grad():
        y0 = model(x)
        plain, _ = dgmr.prune(copy.deepcopy(model), hidden=8, progress=False)
        exact, rec = dgmr.prune(copy.deepcopy(model), hidden=8, calibration=x, ridge=1e-12, progress=False)
        default, _ = dgmr.prune(copy.deepcopy(model), hidden=8, calibration=x, progress=False)
        assert _rel(plain(x), y0) > 0.1  # the cut alone loses a lot
        assert _rel(exact(x), y0) < 1e-6
        assert _rel(default(x), y0) < 1e-3  # the default ridge costs a little exactness
    assert all(layer["rel_err_after"] < 1e-10 for layer in rec.layers)


def test_sequential_refit_sees_the_already_cut_blocks():
    """Block 2's target is the ORIGINAL MLP on the input the CUT block 1 produces."""
    torch.manual_seed(0)
    model = _LinearBlocks(act=nn.GELU()).eval()
    x = _images(16, n=16)
    seen = []
    with torch.no_grad():
        pruned, _ = dgmr.prune(copy.deepcopy(model), hidden=6, calibration=x, progress=False)
        hook = pruned.blocks[1]["mlp"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        pruned(x)
        hook.remove()
        original_input = model.embed(nn.functional.unfold(x, 4, stride=4).transpose(1, 2))
        original_input = original_input + model.blocks[0]["mlp"](original_input)
    # the second block's input differs from the unpruned model's: it was refit on the former
    assert _rel(seen[0], original_input) > 1e-4


def _textbook_greedy(cols: torch.Tensor, k: int) -> list[int]:
    """Greedy Gram-Schmidt on the columns: pick the largest residual, project it out."""
    r = cols.clone()
    picks = []
    for _ in range(k):
        j = int(torch.argmax((r * r).sum(0)))
        picks.append(j)
        q = r[:, j] / r[:, j].norm()
        r = r - q[:, None] * (q @ r)[None]
        r[:, j] = 0
    return picks


def test_diversity_act_is_greedy_gram_schmidt_on_weighted_activations():
    torch.manual_seed(0)
    model = GenericNet(d=8, h=32, depth=1).eval()
    x = _images(16, n=20)
    mlp = model.blocks[0]["mlp"]
    with torch.no_grad():
        tokens = model.embed(nn.functional.unfold(x, 8, stride=8).transpose(1, 2))
        acts = mlp[1](mlp[0](model.blocks[0]["norm"](tokens))).reshape(-1, 32).double()
        scale = torch.linalg.vector_norm(matrix(mlp[2]).double(), dim=0)
        want = sorted(_textbook_greedy(acts * scale, 10))
        _, rec = dgmr.prune(copy.deepcopy(model), hidden=10, criterion="diversity-act", calibration=x, ridge=1e-12,
                            progress=False)
    assert rec.kept["blocks.0.mlp"].tolist() == want
    assert rec.calibration["criterion"] == "diversity-act"


def _moments(h: int = 12, d: int = 5, n: int = 200, bias: bool = True) -> tuple[Moments, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    y = hid @ torch.randn(h, d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g, dtype=torch.float64)
    mom = Moments("layer", bias)
    mom.add(hid[:90], y[:90])
    mom.add(hid[90:], y[90:])  # accumulated over batches
    return mom, hid, y


@pytest.mark.parametrize("bias", [True, False])
def test_compensated_curve_is_the_least_squares_residual_of_every_prefix(bias):
    mom, hid, y = _moments(bias=bias)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    curve = compensated_curve(mom, order, ridge=1e-12)
    for k in (0, 1, 5, 12):
        cols = hid[:, order[:k]]
        if bias:
            cols = torch.cat([cols, torch.ones(len(hid), 1, dtype=hid.dtype)], 1)
        resid = y - cols @ torch.linalg.lstsq(cols, y).solution if cols.shape[1] else y
        assert float(curve[k]) == pytest.approx(float((resid ** 2).sum() / (y ** 2).sum()), rel=1e-6, abs=1e-9)


def test_dropped_curve_is_the_output_the_dropped_neurons_wrote():
    mom, hid, y = _moments(bias=False)
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    curve = dropped_curve(mom, order, w)
    for k in (0, 3, 11, 12):
        drop = order[k:]
        want = float(((hid[:, drop] @ w[:, drop].T) ** 2).sum() / (y ** 2).sum())
        assert float(curve[k]) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_spend_keeps_the_budget_and_bounds_and_follows_the_errors():
    # layer 0's error vanishes after 2 neurons, layer 1's falls slowly: layer 1 gets the neurons
    flat = torch.cat([torch.tensor([1.0, 0.5]), torch.zeros(15)])
    slow = torch.linspace(1.0, 0.0, 17)
    lo, hi = bounds([8, 8], [16, 16], [1, 1], floor=0.5, ceiling=1.5)
    widths = spend([flat, slow], [3.0, 3.0], 3.0 * 8 + 3.0 * 8, lo, hi, [1, 1])
    assert widths == [4, 12]  # floor 4 for layer 0, ceiling 12 for layer 1, total 16 = the uniform budget
    lo, hi = bounds([8, 8], [16, 16], [1, 4], floor=0.5, ceiling=2.0)
    costly = spend([slow, slow], [1.0, 3.0], 8 * 1.0 + 8 * 3.0, lo, hi, [1, 4])
    assert costly[1] % 4 == 0 and costly[0] * 1.0 + costly[1] * 3.0 <= 8 * 1.0 + 8 * 3.0


def test_global_allocation_spends_the_uniform_budget_and_lands_in_the_config(tmp_path):
    torch.manual_seed(0)
    model = GenericNet(d=8, h=32, depth=3).eval()
    with torch.no_grad():  # a nearly linear first MLP (few directions matter) and two rich ones
        model.blocks[0]["mlp"][0].weight.mul_(0.01)
    x = _images(16, n=24)
    _, uni = dgmr.prune(copy.deepcopy(model), hidden=8, calibration=x, progress=False)
    pruned, rec = dgmr.prune(copy.deepcopy(model), hidden=8, calibration=x, allocate="global", progress=False)
    widths = list(rec.widths.values())
    assert sum(widths) <= 3 * 8 and all(4 <= k <= 16 for k in widths) and len(set(widths)) > 1
    assert widths[0] == min(widths)
    total = lambda r: sum(layer["rel_err_after"] for layer in r.layers)  # noqa: E731
    assert total(rec) <= total(uni) + 1e-6
    cfg = dgmr.save(pruned, tmp_path / "g", record=rec)
    assert cfg["widths"] == rec.widths and cfg["prune"]["calibration"]["allocate"] == "global"
    assert list(dgmr.load(tmp_path / "g", model=GenericNet(d=8, h=32, depth=3)).parameters())


def test_few_tokens_warn_and_still_refit():
    model = GenericNet(d=8, h=64, depth=1).eval()
    x = _images(16, n=2)  # 2 images x 4 tokens = 8 tokens for 32 kept neurons
    with pytest.warns(CalibrationWarning, match="8 calibration tokens for 32 kept neurons"):
        _, rec = dgmr.prune(model, hidden=32, calibration=x, progress=False)
    assert rec.layers[0]["rel_err_after"] <= rec.layers[0]["rel_err_before"]


def test_python_api_refusals():
    model = GenericNet().eval()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(dgmr.DgmrError, match="needs calibration images"):
        dgmr.prune(model, hidden=8, criterion="diversity-act", progress=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # refused before the first cut
    with pytest.raises(dgmr.DgmrError, match="need calibration images"):
        dgmr.prune(model, hidden=8, allocate="global", progress=False)
    with pytest.raises(TypeError, match="calibraton"):
        dgmr.prune(model, hidden=8, calibraton=_images(16), progress=False)
    with pytest.raises(dgmr.DgmrError, match="calibration changes nothing here"):
        dgmr.prune(model, hidden=8, calibration=_images(16), compensation=False, progress=False)
    with torch.no_grad():
        model.blocks[1]["norm"].weight[0] = float("nan")
    with pytest.raises(dgmr.DgmrError, match="blocks.1.mlp: non-finite activations.*nothing was cut"):
        dgmr.prune(model, hidden=8, calibration=_images(16), progress=False)
    assert [s.hidden for s in family_of(model).mlps(model)] == [64, 64]  # refused before the first cut


class _Fallback(GenericNet):
    """A forward that retries on any Exception (as some wrappers do): calibration's early stop must pass through."""

    def forward(self, x):
        try:
            return super().forward(x)
        except Exception:
            return super().forward(x)


class _Shared(GenericNet):
    def forward(self, x):
        x = self.embed(nn.functional.unfold(x, 8, stride=8).transpose(1, 2))
        for _ in range(2):  # one MLP run twice: weights shared between two calls
            x = x + self.blocks[0]["mlp"](self.blocks[0]["norm"](x))
        return x


def test_models_calibration_cannot_fit_are_refused_whole_and_odd_forwards_are_handled():
    x = _images(16, n=4)
    _, rec = dgmr.prune(_Fallback(depth=1).eval(), hidden=8, calibration=x, progress=False)
    assert rec.layers[0]["tokens"] == 4 * 4  # counted once, though the model catches Exception
    shared = _Shared(depth=1).eval()
    with pytest.raises(dgmr.DgmrError, match="blocks.0.mlp runs 2 times per forward"):
        dgmr.prune(shared, hidden=8, calibration=x, progress=False)
    assert shared.blocks[0]["mlp"][0].out_features == 64
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1).eval()
    with pytest.raises(dgmr.DgmrError, match=r"forward failed on the calibration images \(batch of shape \(4, 3, 16, 16\)"):
        dgmr.prune(vit, mlp_ratio=1.0, calibration=x, progress=False)


def test_half_precision_models_keep_their_dtype_and_modules_their_modes():
    model = GenericNet(depth=2).to(torch.bfloat16)
    model.train()
    model.blocks[0]["norm"].eval()  # a frozen part
    _, rec = dgmr.prune(model, hidden=16, calibration=_images(16, n=8), progress=False)
    assert rec.calibration["precision"] == "fp32" and rec.calibration["device"] == "cpu"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.training and not model.blocks[0]["norm"].training and model.blocks[1]["norm"].training
    assert all(layer["rel_err_after"] < layer["rel_err_before"] for layer in rec.layers)


def test_loader_batches_may_be_tuples_or_dicts():
    x = _images(16, n=6)
    loader = [{"pixel_values": x[:3], "label": 0}, (x[3:], torch.zeros(3))]
    _, rec = dgmr.prune(GenericNet().eval(), hidden=8, calibration=iter(loader), progress=False)
    assert rec.calibration["images"] == 6
    with pytest.raises(dgmr.DgmrError, match="without pixel_values/image/images"):
        dgmr.prune(GenericNet().eval(), hidden=8, calibration=iter([{"x": x}]), progress=False)


def test_cli_calibrated_prune_end_to_end(cli, tmp_path):
    data = tmp_path / "unlabeled"
    image_folder(data, ["a", "b"], per_class=5, size=lambda i: (40 + 3 * i, 36), style="noise")
    (data / "a" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "cal"
    code, stdout, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--calibration", data,
                            "--calibration-images", "8", "--allocate", "global", "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["calibration"]["images"] == 8 and summary["calibration"]["allocate"] == "global"
    assert summary["calibration"]["rel_err_after"] < summary["calibration"]["rel_err_before"]
    cfg = json.loads((out / "dgmr.json").read_text())
    cal = cfg["prune"]["calibration"]
    assert cal["images"] == 8 and cal["preprocess"]["library"] == "timm" and cal["criterion"] == "diversity"
    assert all("rel_err_after" in layer and "rel_err_estimate" in layer for layer in cfg["prune"]["layers"])
    if len(set(cfg["widths"].values())) > 1:  # per-layer widths: timm's one mlp_ratio cannot say them
        assert "per-layer MLP widths" in cfg["native_export"]["skipped"]
    assert [s.hidden for s in family_of(dgmr.load(out)).mlps(dgmr.load(out))] == list(cfg["widths"].values())


@pytest.mark.parametrize("extra, message", [
    (["--criterion", "diversity-act"], "--criterion diversity-act scores activations: give --calibration"),
    (["--allocate", "global"], "--allocate applies to calibrated pruning only"),
    (["--calibration", "{data}", "--weights", "{data}/w.safetensors"], "--calibration and --weights exclude"),
    (["--calibration", "{empty}"], "no readable calibration image"),
])
def test_cli_calibration_refusals(cli, tmp_path, extra, message):
    data, empty = tmp_path / "data", tmp_path / "empty"
    image_folder(data, ["a"], per_class=2, style="noise")
    empty.mkdir()
    (empty / "x.png").write_bytes(b"\x89PNG broken")
    argv = [a.format(data=data, empty=empty) for a in extra]
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", *argv, "--out", tmp_path / "out")
    assert code == 2 and err.startswith("dgmr: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
def test_calibration_on_the_gpu_matches_the_cpu():
    torch.manual_seed(0)
    model = GenericNet(d=16, h=64, depth=2).eval()
    x = _images(16, n=32)
    cpu, rec_cpu = dgmr.prune(copy.deepcopy(model), hidden=16, calibration=x, progress=False, device="cpu")
    gpu, rec_gpu = dgmr.prune(copy.deepcopy(model), hidden=16, calibration=x, progress=False, device="cuda")
    assert rec_gpu.calibration["device"] == "cuda" and next(gpu.parameters()).device.type == "cpu"
    assert rec_gpu.kept["blocks.0.mlp"].tolist() == rec_cpu.kept["blocks.0.mlp"].tolist()
    with torch.no_grad():  # bf16 autocast on the GPU: close, not equal
        assert _rel(gpu(x), cpu(x)) < 0.05


def test_pil_images_are_decoded_with_the_models_eval_transform():
    import timm
    from PIL import Image

    from helpers import TINY_VIT_KWARGS

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS).eval()
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(30 + i, 50, 3, generator=g) * 255).byte().numpy()) for i in range(6)]
    _, rec = dgmr.prune(model, mlp_ratio=1.0, calibration=images, calibration_images=4, progress=False)
    cal = rec.calibration
    assert cal["images"] == 4 and cal["preprocess"]["library"] == "timm"
    assert cal["preprocess"]["input_size"] == [3, 32, 32]
    assert all(layer["tokens"] == 4 * 17 for layer in rec.layers)  # 16 patches + CLS per image
