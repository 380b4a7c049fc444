"""The extension points end to end: a neuron criterion, an MLP kind and a model family that a
user registers, each used by `dgmr prune` (the family also through dgmr.prune/save/load) and
reloaded with dgmr.load; and the rules every registry follows (taken names, replace=True,
user entries first, the generic fallback)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dgmr
from dgmr import CRITERIA, FAMILIES, MLP_KINDS, DgmrError
from dgmr.models.families import TimmFamily

from helpers import TINY_VIT_ARGV, TINY_VIT_KWARGS
from tiny_models import GenericNet


@pytest.fixture
def restore_registries():
    """For tests that replace a built-in: put every registry back as it was, order included
    (re-adding a built-in through the public API would move it to the end of the lookup)."""
    regs = (CRITERIA, MLP_KINDS, FAMILIES)
    saved = [(dict(r._user), dict(r._builtin)) for r in regs]
    yield
    for r, (user, builtin) in zip(regs, saved):
        r._user.clear()
        r._user.update(user)
        r._builtin.clear()
        r._builtin.update(builtin)


def _config(out) -> dict:
    return json.loads((out / "dgmr.json").read_text())


# -- a criterion ---------------------------------------------------------------------------
def test_custom_criterion_through_cli(cli, capsys, tmp_path):
    builtins = list(CRITERIA)
    seen: list[tuple[torch.Tensor, int, int]] = []

    def far_from_mean(w: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
        """The k rows farthest from the mean row, farthest first (dgmr sorts them)."""
        seen.append((w.clone(), k, seed))
        return torch.argsort((w - w.mean(0)).norm(dim=1), descending=True)[:k]

    argv = ["prune", *TINY_VIT_ARGV, "--mlp-ratio", "0.5", "--criterion", "far_from_mean", "--seed", "7", "--json"]
    # the --criterion choices come from the registry when the parser is built: unknown before registering
    with pytest.raises(SystemExit) as e:
        cli(*argv, "--out", str(tmp_path / "before"))
    assert e.value.code == 2 and "invalid choice: 'far_from_mean'" in capsys.readouterr().err
    assert not (tmp_path / "before").exists()

    dgmr.register_criterion("far_from_mean")(far_from_mean)
    try:
        assert list(CRITERIA)[0] == "far_from_mean"  # a user's entry comes before the built-ins
        out = tmp_path / "pruned"
        code, stdout, err = cli(*argv, "--out", str(out))
        assert code == 0, err
        res = json.loads(stdout)
        assert res["criterion"] == "far_from_mean" and res["hidden_after"] == [96]
        # called once per MLP, on that layer's fc1 rows in float64, with seed + layer index
        assert [(tuple(w.shape), w.dtype, k, seed) for w, k, seed in seen] == [
            ((768, 192), torch.float64, 96, 7), ((768, 192), torch.float64, 96, 8)]
        cfg = _config(out)
        assert cfg["prune"]["criterion"] == "far_from_mean" and cfg["prune"]["seed"] == 7
        assert [layer["kind"] for layer in cfg["prune"]["layers"]] == ["fc1_fc2", "fc1_fc2"]
        kept = load_file(str(out / "dgmr" / "kept_indices.safetensors"))
        model = dgmr.load(out)
        for i, (w, k, _) in enumerate(seen):
            name = f"blocks.{i}.mlp"
            want = torch.sort(torch.argsort((w - w.mean(0)).norm(dim=1), descending=True)[:k]).values
            assert torch.equal(kept[name], want)  # what the criterion chose, in ascending order
            assert cfg["widths"][name] == k
            # ... and the reloaded model holds exactly those fc1 rows of the original weights
            mlp = model.blocks[i].mlp
            assert mlp.fc1.out_features == mlp.fc2.in_features == k
            assert torch.equal(mlp.fc1.weight, w[want].to(mlp.fc1.weight.dtype))
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    finally:
        CRITERIA.remove("far_from_mean")
    assert "far_from_mean" not in CRITERIA and list(CRITERIA) == builtins
    with pytest.raises(SystemExit):
        cli(*argv, "--out", str(tmp_path / "after"))
    with pytest.raises(DgmrError, match="unknown criterion 'far_from_mean'"):
        dgmr.prune(GenericNet(), mlp_ratio=1, criterion="far_from_mean", progress=False)


# -- an MLP kind ---------------------------------------------------------------------------
def test_custom_mlp_kind_wins_over_builtin_through_cli(cli, tmp_path):
    import timm
    from timm.layers import Mlp

    asked: list[str] = []

    def timm_mlp(path: str, m: nn.Module) -> dgmr.MlpSite | None:
        """timm's Mlp by its class (the built-in fc1_fc2 goes by attribute names)."""
        if not isinstance(m, Mlp):
            return None
        asked.append(path)
        return dgmr.MlpSite(path, m, "timm_mlp", m.fc1, m.fc2)

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
    assert [s.kind for s in dgmr.family_of(vit).mlps(vit)] == ["fc1_fc2", "fc1_fc2"]  # what it wins over
    dgmr.register_mlp_kind("timm_mlp")(timm_mlp)
    try:
        assert list(MLP_KINDS)[0] == "timm_mlp"
        assert [(s.name, s.kind) for s in dgmr.family_of(vit).mlps(vit)] == [
            ("blocks.0.mlp", "timm_mlp"), ("blocks.1.mlp", "timm_mlp")]
        out = tmp_path / "pruned"
        code, stdout, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "1", "--out", str(out), "--json")
        assert code == 0, err
        assert {"blocks.0.mlp", "blocks.1.mlp"} <= set(asked)
        cfg = _config(out)
        assert [(layer["name"], layer["kind"]) for layer in cfg["prune"]["layers"]] == [
            ("blocks.0.mlp", "timm_mlp"), ("blocks.1.mlp", "timm_mlp")]
        assert cfg["widths"] == {"blocks.0.mlp": 192, "blocks.1.mlp": 192}
        assert cfg["native_export"]["mlp_ratio"] == 1  # the timm export reads the widths through the kind too
        model = dgmr.load(out)
        assert [s.kind for s in dgmr.family_of(model).mlps(model)] == ["timm_mlp", "timm_mlp"]
        assert model.blocks[1].mlp.fc1.out_features == 192
        saved = load_file(str(out / "model.safetensors"))
        assert saved.keys() == model.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    finally:
        MLP_KINDS.remove("timm_mlp")
    # without it the built-in finds the same MLPs again: the directory still loads, and prunes
    assert "timm_mlp" not in MLP_KINDS
    model = dgmr.load(out)
    assert [s.kind for s in dgmr.family_of(model).mlps(model)] == ["fc1_fc2", "fc1_fc2"]
    again = tmp_path / "again"
    code, stdout, err = cli("prune", str(out), "--keep-fraction", "0.5", "--out", str(again), "--json")
    assert code == 0, err
    assert [layer["kind"] for layer in _config(again)["prune"]["layers"]] == ["fc1_fc2", "fc1_fc2"]
    assert dgmr.load(again).blocks[0].mlp.fc1.out_features == 96


# -- a family --------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """An MLP with names no built-in kind knows (and `ff` is not named like an MLP)."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.expand, self.act, self.contract = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.contract(self.act(self.expand(x)))


class Tower(nn.Module):
    def __init__(self, d: int, h: int, depth: int, patch: int | None = None) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, d) if patch else nn.Embedding(50, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.ff = nn.ModuleList(FeedForward(d, h) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch:
            x = nn.functional.unfold(x, self.patch, stride=self.patch).transpose(1, 2)
        x = self.embed(x)
        for norm, ff in zip(self.norms, self.ff):
            x = x + ff(norm(x))
        return x


class TwoTowers(nn.Module):
    """A CLIP-like user model: an image tower and a text tower, both with MLPs; only the
    image tower's are to be pruned."""

    def __init__(self, d: int = 16, h: int = 64) -> None:
        super().__init__()
        self.image = Tower(d, h, depth=2, patch=8)
        self.text = Tower(d, h, depth=1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(images).mean(1), self.text(tokens).mean(1)


class TwoTowersFamily(dgmr.Family):
    """What dgmr needs to know about TwoTowers: where the image tower is, where its MLPs are."""

    name = "two_towers"

    @classmethod
    def classes(cls):
        return (TwoTowers,)

    def vision_root(self, model):
        return "image", model.image

    def mlps(self, model):
        prefix, tower = self.vision_root(model)
        return [dgmr.MlpSite(f"{prefix}.ff.{i}", ff, "two_towers_ff", ff.expand, ff.contract)
                for i, ff in enumerate(tower.ff)]

    def image_size(self, model):
        return 16


def test_custom_family_prune_save_load(tmp_path):
    torch.manual_seed(0)
    model = TwoTowers()
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 5))
    # no registered family owns it, and the generic one finds no MLP in it
    assert isinstance(dgmr.family_of(model), dgmr.GenericFamily)
    with pytest.raises(DgmrError, match="no MLP found"):
        dgmr.prune(model, mlp_ratio=2, progress=False)

    assert dgmr.register_family(TwoTowersFamily) is TwoTowersFamily  # the decorator, applied by hand
    try:
        assert list(FAMILIES)[0] == "two_towers"  # asked before every built-in family
        fam = dgmr.family_of(model)
        assert isinstance(fam, TwoTowersFamily)
        assert isinstance(dgmr.family_of(type("MyTwoTowers", (TwoTowers,), {})()), TwoTowersFamily)  # subclasses too
        assert dgmr.family_of(GenericNet()).name == "generic"  # and nothing else
        assert fam.vision_params(model) == sum(p.numel() for p in model.image.parameters())
        assert fam.data_config(model)["image_size"] == 16
        with torch.no_grad():
            assert torch.equal(fam.image_forward(model, images), model.image(images))  # the vision root runs

        text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
        model, rec = dgmr.prune(model, mlp_ratio=2, progress=False)
        assert rec.widths == {"image.ff.0": 32, "image.ff.1": 32}
        assert [layer["kind"] for layer in rec.layers] == ["two_towers_ff"] * 2
        assert model.image.ff[0].expand.out_features == model.image.ff[1].contract.in_features == 32
        assert model.text.ff[0].expand.out_features == 64  # the text tower is not pruned
        assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in text_before.items())
        with torch.no_grad():
            want = model(images, tokens)

        out = tmp_path / "pruned"
        cfg = dgmr.save(model, out, record=rec)
        assert cfg["family"] == "two_towers" and cfg["class"] == "TwoTowers" and cfg["source"] is None
        assert cfg["widths"] == rec.widths and "skipped" in cfg["native_export"]
        assert cfg["vision_params"] == sum(p.numel() for p in model.image.parameters())
        assert _config(out) == json.loads(json.dumps(cfg, default=str))
        kept = load_file(str(out / "dgmr" / "kept_indices.safetensors"))
        assert all(torch.equal(kept[k], rec.kept[k]) for k in rec.widths)

        # no source to rebuild it from: dgmr.load needs the unpruned architecture (other random weights)
        with pytest.raises(DgmrError, match="pass the unpruned architecture"):
            dgmr.load(out)
        torch.manual_seed(1)
        again = dgmr.load(out, model=TwoTowers())
        assert again.image.ff[1].expand.out_features == 32 and again.text.ff[0].expand.out_features == 64
        assert not again.training
        with torch.no_grad():
            got = again(images, tokens)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        FAMILIES.remove("two_towers")
    # unregistered: the directory names a family nobody knows, and the model is generic again
    assert "two_towers" not in FAMILIES
    with pytest.raises(DgmrError, match="unknown family 'two_towers'"):
        dgmr.load(out, model=TwoTowers())
    assert isinstance(dgmr.family_of(TwoTowers()), dgmr.GenericFamily)


def test_custom_family_for_timm_models_through_cli(cli, tmp_path):
    """A user's family can claim a library's models too (it is asked before the built-in
    one): here timm ViTs with only the even blocks' MLPs pruned, through `dgmr prune`."""
    import timm
    from timm.models import VisionTransformer

    @dgmr.register_family
    class EvenBlocks(TimmFamily):
        name = "timm_even_blocks"

        @classmethod
        def classes(cls):
            return (VisionTransformer,)

        @classmethod
        def detect(cls, model):
            return dgmr.Family.detect.__func__(cls, model)  # the base rule: isinstance of classes()

        def mlps(self, model):
            return [s for s in super().mlps(model) if int(s.name.split(".")[1]) % 2 == 0]

    try:
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
        assert dgmr.family_of(vit).name == "timm_even_blocks"
        out = tmp_path / "pruned"
        code, stdout, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "0.5", "--no-native", "--out", str(out),
                                "--json")
        assert code == 0, err
        assert json.loads(stdout)["family"] == "timm_even_blocks"
        cfg = _config(out)
        assert cfg["family"] == "timm_even_blocks" and cfg["widths"] == {"blocks.0.mlp": 96}
        model = dgmr.load(out)  # rebuilt from the recorded timm source, cut by the recorded family
        assert isinstance(model, VisionTransformer)
        assert model.blocks[0].mlp.fc1.out_features == 96 and model.blocks[1].mlp.fc1.out_features == 768
        saved = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    finally:
        FAMILIES.remove("timm_even_blocks")
    assert dgmr.family_of(vit).name == "timm"
    with pytest.raises(DgmrError, match="unknown family 'timm_even_blocks'"):
        dgmr.load(out)


# -- registry rules ------------------------------------------------------------------------
def test_taken_names_are_refused_without_replace():
    def crit(w, k, *, seed=0):
        return torch.arange(k)

    def kind(path, m):
        return None

    class Timm2(TimmFamily):
        name = "timm"

    before = {r.what: dict(r) for r in (CRITERIA, MLP_KINDS, FAMILIES)}
    with pytest.raises(DgmrError, match="criterion named 'l2' is already registered.*replace=True"):
        dgmr.register_criterion("l2")(crit)
    with pytest.raises(DgmrError, match="MLP kind named 'fc1_fc2' is already registered"):
        dgmr.register_mlp_kind("fc1_fc2")(kind)
    with pytest.raises(DgmrError, match="family named 'timm' is already registered"):
        dgmr.register_family(Timm2)
    with pytest.raises(DgmrError, match="already registered"):  # a user's name is taken the same way
        dgmr.register_criterion("mine")(crit)
        dgmr.register_criterion("mine")(crit)
    CRITERIA.remove("mine")
    assert {r.what: dict(r) for r in (CRITERIA, MLP_KINDS, FAMILIES)} == before  # nothing changed
    with pytest.raises(DgmrError, match="non-empty name"):
        dgmr.register_criterion("")(crit)
    with pytest.raises(DgmrError, match="takes a Family subclass"):
        dgmr.register_family(GenericNet)
    with pytest.raises(DgmrError, match=re.escape(f"unknown criterion 'nope'; choose one of: {', '.join(CRITERIA)}")):
        CRITERIA.remove("nope")


def test_replace_builtin_criterion_is_used_by_cli(cli, tmp_path, restore_registries):
    builtin_l2, n = CRITERIA["l2"], len(CRITERIA)

    @dgmr.register_criterion("l2", replace=True)
    def last_rows(w, k, *, seed=0):
        return torch.arange(w.shape[0] - k, w.shape[0])

    assert CRITERIA["l2"] is last_rows and CRITERIA["l2"] is not builtin_l2
    assert list(CRITERIA)[0] == "l2" and len(CRITERIA) == n  # now a user entry, not a second one
    out = tmp_path / "pruned"
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--hidden", "100", "--criterion", "l2", "--out", str(out))
    assert code == 0, err
    kept = load_file(str(out / "dgmr" / "kept_indices.safetensors"))
    assert set(kept) == {"blocks.0.mlp", "blocks.1.mlp"}
    assert all(torch.equal(v, torch.arange(668, 768)) for v in kept.values())
    assert dgmr.load(out).blocks[0].mlp.fc2.in_features == 100


def test_replace_builtin_kind_and_family(restore_registries):
    import timm

    def fc1_fc2_v2(path, m):
        site = builtin_kind(path, m)
        if site is not None:
            site.kind = "fc1_fc2_v2"
        return site

    builtin_kind = MLP_KINDS["fc1_fc2"]
    dgmr.register_mlp_kind("fc1_fc2", replace=True)(fc1_fc2_v2)

    @dgmr.register_family(replace=True)
    class MyTimm(TimmFamily):
        name = "timm"

    assert FAMILIES["timm"] is MyTimm and MLP_KINDS["fc1_fc2"] is fc1_fc2_v2
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT_KWARGS)
    fam = dgmr.family_of(vit)
    assert type(fam) is MyTimm
    _, rec = dgmr.prune(vit, mlp_ratio=1, progress=False)
    assert [layer["kind"] for layer in rec.layers] == ["fc1_fc2_v2", "fc1_fc2_v2"]


def test_user_entries_come_first_latest_first():
    builtins = list(CRITERIA)

    def a(w, k, *, seed=0):
        return torch.arange(k)

    def b(w, k, *, seed=0):
        return torch.arange(k)

    dgmr.register_criterion("user_a")(a)
    dgmr.register_criterion("user_b")(b)
    try:
        assert list(CRITERIA) == ["user_b", "user_a", *builtins]
        assert len(CRITERIA) == len(builtins) + 2 and CRITERIA["user_a"] is a
        # replacing a user entry moves it to the front
        dgmr.register_criterion("user_a", replace=True)(b)
        assert list(CRITERIA) == ["user_a", "user_b", *builtins] and CRITERIA["user_a"] is b
    finally:
        CRITERIA.remove("user_a")
        CRITERIA.remove("user_b")
    assert list(CRITERIA) == builtins


def test_timm_subclass_is_timm_and_anything_else_generic():
    from timm.models import VisionTransformer

    class MyViT(VisionTransformer):
        """A user's subclass of a timm model, defined outside timm."""

    vit = MyViT(**TINY_VIT_KWARGS, embed_dim=32, num_heads=2, num_classes=0)
    fam = dgmr.family_of(vit)
    assert fam.name == "timm" and isinstance(fam, TimmFamily)
    _, rec = dgmr.prune(vit, mlp_ratio=1, progress=False)
    assert rec.widths == {"blocks.0.mlp": 32, "blocks.1.mlp": 32}

    from dgmr import Family, GenericFamily  # noqa: F401  (both are public)

    for m in (nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), GenericNet(), nn.Module()):
        fam = dgmr.family_of(m)
        assert type(fam) is GenericFamily and fam.name == "generic" and isinstance(fam, dgmr.Family)
    assert "generic" not in FAMILIES  # the fallback is not a registry entry
    assert not Family.detect(GenericNet())  # the base class owns nothing: classes() is ()


def test_criterion_returning_wrong_count_is_one_line_error(cli, tmp_path):
    dgmr.register_criterion("too_few")(lambda w, k, *, seed=0: torch.arange(k - 1))
    try:
        code, _, err = cli("prune", *TINY_VIT_ARGV, "--mlp-ratio", "0.5", "--criterion", "too_few", "--json",
                           "--out", str(tmp_path / "p"))
    finally:
        CRITERIA.remove("too_few")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "criterion 'too_few' returned" in lines[0], err
    assert not (tmp_path / "p").exists()


def test_timm_export_checks_every_shape_not_only_the_pruned_mlps(cli, tmp_path):
    """timm sizes the attention-pooling head's MLP from the same mlp_ratio dgmr leaves alone:
    no timm config describes the pruned model, so the native export is skipped (and says why)
    while dgmr.load still rebuilds it."""
    kw = {**TINY_VIT_KWARGS, "global_pool": "map"}
    code, _, err = cli("prune", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(kw),
                       "--mlp-ratio", "1", "--out", str(tmp_path / "p"))
    assert code == 0, err
    cfg = _config(tmp_path / "p")
    assert "attn_pool" in cfg["native_export"]["skipped"]
    assert not (tmp_path / "p" / "config.json").exists()
    model = dgmr.load(tmp_path / "p")
    assert model.attn_pool.mlp.fc1.out_features == 4 * model.embed_dim
    assert {s.hidden for s in dgmr.family_of(model).mlps(model)} == {model.embed_dim}
