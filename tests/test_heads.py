"""Attention heads: the sites of every library, the one surgery routine, the head criteria,
saving and loading, params and FLOPs, and every refusal (issue 20, part A)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import dgmr
from dgmr.models import artifact
from dgmr.models.cost import count_flops
from dgmr.models.families import family_of
from dgmr.models.sites.attention import AttentionSite, find_attention, head_channels, shrink_heads
from dgmr.models.sites.head_modules import head_attention_from
from dgmr.prune.head_criteria import HEAD_CRITERIA, diversity, l2, random, register_head_criterion, select_heads

from helpers import TINY_VIT_ARGV, TINY_VIT_KWARGS, TINY_VIT_SPEC
from tiny_models import CASES, HEAD_CASES, REFUSED_HEAD_CASES, GenericAttnNet, build, output

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

ATTENTION_CASES = [c for c in CASES if c.attention] + HEAD_CASES


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory):
    return tmp_path_factory.mktemp("head-configs")


def _x(case, n=2):
    return torch.randn(n, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(1))


def _rows(site: AttentionSite, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the kept heads' rows of every q/k/v (and gate) tensor are, from the original tensors."""
    cols = head_channels(keep, site.head_dim)
    out = {}
    for i, (owner, name, layout) in enumerate(site.rows):
        idx = torch.cat([cols + b * site.width for b in range(len(layout))])
        out[f"{i}:{name}"] = getattr(owner, name).detach()[idx].clone()
    return out


def _zero_dropped_values(site: AttentionSite, keep: torch.Tensor) -> None:
    """Zero the dropped heads' value rows (and value biases): what removing them computes."""
    drop = torch.tensor([j for j in range(site.heads) if j not in set(keep.tolist())], dtype=torch.long)
    cols = head_channels(drop, site.head_dim)
    with torch.no_grad():
        for owner, name, layout in site.rows:
            for b, role in enumerate(layout):
                if role == "v":
                    getattr(owner, name)[cols + b * site.width] = 0


def _removed_params(site: AttentionSite, k: int) -> int:
    """Parameters that cutting ``site`` to ``k`` heads removes: each q/k/v/gate tensor, width
    norm and per-head table loses (h - k) / h of its entries, the output projection (h - k)
    x head_dim columns."""
    h = site.heads
    tensors = [getattr(o, n) for o, n, _ in site.rows] + [getattr(o, n) for o, n, _ in site.tables]
    tensors += [p for norm in site.norms for p in norm.parameters()]
    n = sum(t.numel() * (h - k) // h for t in tensors if isinstance(t, nn.Parameter))
    return n + site.proj.out_features * (h - k) * site.head_dim


# -- sites, cut, save, load: every library ----------------------------------------------
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_heads_cut_save_load(case, cfgdir, tmp_path):
    model, src = build(case, cfgdir)
    fam = family_of(model)
    sites = fam.attention(model)
    assert sites and {s.kind for s in sites} == set(case.attention)
    assert not any(part in s.name.split(".") for s in sites for part in ("attn_pool", "head", "text", "text_model"))
    x = _x(case)
    ref = copy.deepcopy(model)
    rows = {s.name: s for s in fam.attention(ref)}
    n0 = sum(p.numel() for p in model.parameters())
    removed = sum(_removed_params(s, (s.heads + 1) // 2) for s in sites)
    model, rec = dgmr.prune(model, head_fraction=0.5, progress=False, source=src)  # halves round up: 3 -> 2, 1 -> 1
    assert [layer["heads_after"] for layer in rec.heads] == [(s.heads + 1) // 2 for s in rows.values()]
    assert not rec.layers  # the MLPs stay: no MLP width was asked for
    assert sum(p.numel() for p in model.parameters()) == n0 - removed
    after = {s.name: s for s in fam.attention(model)}
    widths_norms = any(s.norms for s in rows.values())
    for layer in rec.heads:
        site, keep = rows[layer["name"]], layer["kept"]
        assert torch.equal(keep, torch.sort(keep).values) and keep.numel() == layer["heads_after"]
        cut = after[layer["name"]]
        assert cut.heads == keep.numel() and cut.head_dim == site.head_dim
        # the kept heads' q/k/v rows are the original rows, unchanged
        for (i_name, want), (owner, name, _) in zip(_rows(site, keep).items(), cut.rows):
            assert torch.equal(getattr(owner, name).detach(), want), (layer["name"], i_name)
        _zero_dropped_values(site, keep)
    with torch.no_grad():
        y = output(fam, model, x)
        if not widths_norms:  # removing heads computes what zeroing their values computes
            torch.testing.assert_close(y, output(fam, ref, x), rtol=1e-5, atol=1e-5)
    out = tmp_path / "pruned"
    cfg = dgmr.save(model, out, source=src, record=rec)
    assert cfg["heads"] == {s.name: s.heads for s in after.values()}
    kept = artifact.load_kept_indices(out)
    assert all(torch.equal(kept[name], k) for name, k in rec.kept_heads.items())
    assert cfg["prune"]["attention"][0]["heads_before"] == rec.heads[0]["heads_before"]
    with torch.no_grad():
        again = dgmr.load(out, model=GenericAttnNet() if src is None else None)
        torch.testing.assert_close(output(fam, again, x), y, rtol=0, atol=0)
    assert [s.heads for s in fam.attention(again)] == [s.heads for s in after.values()]
    note = cfg["native_export"]
    if case.native_heads:
        assert "skipped" not in note, note
        with torch.no_grad():
            torch.testing.assert_close(_native(case, out, cfg, x), y, rtol=0, atol=0)
    else:
        assert "skipped" in note and ("head" in note["skipped"] or case.family == "generic"), note


def _native(case, out, cfg, x):
    """The recorded load line, run as printed: the output is a model repository of its library
    (timm's hub config.json, transformers' config.json beside the weights at the top)."""
    scope = {}
    exec("import timm, transformers", scope)
    m = eval(cfg["native_export"]["load"].replace("DIR", str(out)), scope).eval()
    if case.family == "timm":
        assert json.loads((out / "config.json").read_text())["model_args"]["num_heads"]  # hub format
        return m(x)
    return output(family_of(m), m, x)


@pytest.mark.parametrize("case", [c for c in ATTENTION_CASES if c.attention[0] in ("timm_eva", "timm_beit", "torch_mha")],
                         ids=lambda c: c.id)
def test_rebuilt_attention_is_exact_at_full_width(case, cfgdir):
    """EVA and BEiT are re-typed, nn.MultiheadAttention replaced, when cut: at full width the
    new forward computes what the library's computes (MHA: its fused inference path and its
    autograd path, to float rounding)."""
    model, _ = build(case, cfgdir)
    fam = family_of(model)
    x = _x(case)
    with torch.no_grad():
        y0 = output(fam, model, x)
    for site in fam.attention(model):
        shrink_heads(site, torch.arange(site.heads))
    assert all(type(s.module).__name__.startswith(("HeadCut", "HeadAttention")) for s in fam.attention(model))
    with torch.no_grad():
        y1 = output(fam, model, x)
    if case.attention[0] == "torch_mha":
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(output(fam, model, x), y0, rtol=1e-5, atol=1e-6)  # with autograd
    else:
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)


def test_head_attention_matches_multihead_attention():
    """HeadAttention from an nn.MultiheadAttention: the same outputs and weights for sequence-first
    and batch-first inputs, self- and cross-attention, bool and float masks, key padding."""
    torch.manual_seed(0)
    for batch_first in (False, True):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        new = head_attention_from(copy.deepcopy(mha))
        x, kv = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
        if batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, -2:] = True
        for args, kw in [((x, x, x), {"need_weights": False}), ((x, x, x), {"attn_mask": causal}),
                         ((x, kv, kv), {"key_padding_mask": pad}), ((x, x, x), {"attn_mask": causal.float() * -1e4})]:
            a, wa = mha(*args, **kw)
            b, wb = new(*args, **kw)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            if wa is not None:
                torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)


def _standalone(module: nn.Module) -> tuple[nn.Module, AttentionSite]:
    holder = nn.Module()
    holder.attn = module.eval()
    (site,) = find_attention(holder)
    return holder, site


@pytest.mark.parametrize("make", ["gated", "gated_scale_norm", "rope_split", "rope_fused_gated", "eva_gated"])
def test_timm_attention_variants(make):
    """timm's gated, scale-normed and rope attention (built directly: no timm model takes all of
    them): the kept rows are the original's, the forward runs, and without a width norm removing
    heads equals zeroing their values."""
    import timm
    from timm.layers import Attention, AttentionRope
    from timm.models.eva import EvaAttention

    torch.manual_seed(0)
    make_module = {"gated": lambda: Attention(32, 4, qkv_bias=True, gated=True, qk_norm=True, norm_layer=nn.LayerNorm),
              "gated_scale_norm": lambda: Attention(32, 4, gated=True, scale_norm=True, norm_layer=nn.LayerNorm),
              "rope_split": lambda: AttentionRope(32, 4, qkv_fused=False, num_prefix_tokens=0),
              "rope_fused_gated": lambda: AttentionRope(32, 4, gated=True, num_prefix_tokens=0),
              "eva_gated": lambda: EvaAttention(32, 4, qkv_fused=True, gated=True, scale_norm=False,
                                                num_prefix_tokens=0)}[make]
    try:
        module = make_module()
    except TypeError as e:  # a layout the oldest supported timm does not have: nothing to cut there
        pytest.skip(f"timm {timm.__version__} has no such attention: {e}")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    holder, site = _standalone(module)
    ref = copy.deepcopy(holder)
    (ref_site,) = find_attention(ref)
    x = torch.randn(2, 9, 32)
    keep = torch.tensor([0, 2])
    want = _rows(site, keep)
    assert any(layout == "g" for _, _, layout in site.rows) == ("gated" in make)
    shrink_heads(site, keep)
    (cut,) = find_attention(holder)
    assert cut.heads == 2 and cut.width == 16 and cut.proj.in_features == 16
    for (_, w), (owner, name, _) in zip(want.items(), cut.rows):
        assert torch.equal(getattr(owner, name).detach(), w)
    _zero_dropped_values(ref_site, keep)
    with torch.no_grad():
        y = holder.attn(x)
        assert y.shape == (2, 9, 32) and torch.isfinite(y).all()
        if not site.norms:
            torch.testing.assert_close(y, ref.attn(x), rtol=1e-5, atol=1e-5)


# -- criteria ------------------------------------------------------------------------------
def _textbook_diversity(w: torch.Tensor, k: int) -> torch.Tensor:
    """Pick, among the heads not kept, the one whose rows keep the most norm after projecting
    out the span of the rows picked in this round (pseudo-inverse projector); a round ends when
    the picked rows could span the features, then starts again from the original rows."""
    h, r, f = w.shape
    picked: list[int] = []
    remaining = list(range(h))
    while len(picked) < k:
        this: list[int] = []
        while len(picked) + len(this) < k and len(this) < len(remaining) and len(this) * r < f:
            span = torch.cat([w[j] for j in this]) if this else torch.zeros(1, f, dtype=w.dtype)
            projector = torch.linalg.pinv(span) @ span
            scores = {j: float((w[j] - w[j] @ projector).pow(2).sum()) for j in remaining if j not in this}
            this.append(max(scores, key=lambda j: (scores[j], -j)))
        picked += this
        remaining = [j for j in remaining if j not in this]
    return torch.tensor(picked)


@pytest.mark.parametrize("shape", [(6, 4, 30), (12, 8, 20), (8, 5, 9), (5, 10, 25), (16, 3, 48)])
def test_diversity_is_the_textbook_block_greedy(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.rand(shape[0], 1, 1, generator=g,
                                                                           dtype=torch.float64)
    for k in range(1, shape[0] + 1):
        assert torch.equal(diversity(w, k), _textbook_diversity(w, k)), k


def test_l2_random_and_select_heads():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 3, 11, generator=g, dtype=torch.float64)
    norms = [float(w[j].pow(2).sum()) for j in range(7)]
    assert l2(w, 3).tolist() == sorted(range(7), key=lambda j: -norms[j])[:3]
    assert torch.equal(random(w, 4, seed=3), random(w, 4, seed=3)) and len(set(random(w, 4, seed=3).tolist())) == 4
    assert not all(torch.equal(random(w, 4, seed=s), random(w, 4, seed=3)) for s in range(3))
    for name in ("diversity", "l2", "random"):
        idx = select_heads(w.float(), 3, name, seed=1)
        assert torch.equal(idx, torch.sort(idx).values) and idx.numel() == 3
    # a head that spans nothing new is picked last by diversity: a copy of head 0
    w2 = torch.cat([w[:1], w[:1] * 1.5, w[1:3]])
    assert 0 not in diversity(w2, 3).tolist() or 1 not in diversity(w2, 3).tolist()
    with pytest.raises(dgmr.DgmrError, match="cannot keep 8 of 7"):
        select_heads(w, 8)
    with pytest.raises(dgmr.DgmrError, match="diversity-act' scores activations: it needs calibration images"):
        select_heads(w, 2, "diversity-act")
    with pytest.raises(dgmr.DgmrError, match="selects neurons only"):
        select_heads(w, 2, "no-such-head-criterion")


def test_register_head_criterion_user_first():
    @register_head_criterion("last-heads")
    def last(w, k, *, seed=0):
        return torch.arange(w.shape[0])[-k:]

    try:
        assert list(HEAD_CRITERIA)[0] == "last-heads"
        model, _ = build(CASES[0], None)
        _, rec = dgmr.prune(model, heads=1, criterion="last-heads", progress=False)
        assert all(layer["kept"].tolist() == [2] for layer in rec.heads)
        with pytest.raises(dgmr.DgmrError, match="already registered"):
            register_head_criterion("l2")(last)
    finally:
        HEAD_CRITERIA.remove("last-heads")


# -- Done when: removal, not masking (timm vit_small, 6 heads of 64) -------------------------
def test_vit_small_r1_three_heads_is_removal(tmp_path, cli):
    from dgmr.models.sources import build_model, parse_spec

    torch.manual_seed(0)
    src = parse_spec("timm:vit_small_patch16_224")
    original = build_model(src, pretrained=False).eval()
    dgmr.save(original, tmp_path / "original", source=src, native=False)
    model, rec = dgmr.prune(copy.deepcopy(original), mlp_ratio=1, heads=3, progress=False, source=src)
    assert sum(p.numel() for p in model.parameters()) == 7_874_152
    assert 22_050_664 - 7_874_152 == 12 * (384 * (1536 - 384) * 2 + (1536 - 384) + 3 * 192 * 385 + 384 * 192)
    for i, (block, layer) in enumerate(zip(original.blocks, rec.heads)):
        keep = layer["kept"]
        assert layer["name"] == f"blocks.{i}.attn" and layer["heads_before"] == 6 and keep.numel() == 3
        rows = torch.cat([head_channels(keep, 64) + b * 384 for b in range(3)])
        assert torch.equal(model.blocks[i].attn.qkv.weight, block.attn.qkv.weight[rows])
        assert torch.equal(model.blocks[i].attn.qkv.bias, block.attn.qkv.bias[rows])
        assert torch.equal(model.blocks[i].attn.proj.weight, block.attn.proj.weight[:, head_channels(keep, 64)])
        assert model.blocks[i].attn.num_heads == 3 and model.blocks[i].attn.attn_dim == 192
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "python"
    dgmr.save(model, out, source=src, record=rec)
    loaded = dgmr.load(out)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())
    with torch.no_grad():  # the same weights; float rounding apart (the loaded tensors' memory layout)
        y = model(x)
        torch.testing.assert_close(loaded(x), y, rtol=1e-5, atol=1e-6)
    code, _, err = cli("prune", tmp_path / "original", "--mlp-ratio", "1", "--heads", "3", "--out", tmp_path / "cli",
                       "--json")
    assert code == 0, err
    a, b = dgmr.load(tmp_path / "cli").state_dict(), model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "cli" / "dgmr.json").read_text())["params_after"] == 7_874_152


# -- bad input: one line, exit 2, model whole ---------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=0), "cannot keep 0 of 3"),
    (dict(heads=4), "cannot keep 4 of 3"),
    (dict(head_fraction=0.1), r"keeps round\(0.1 x 3\) = 0"),
    (dict(params_fraction=0.5), "give calibration images and allocate='global'"),
    (dict(params_fraction=0.5, calibration=[torch.zeros(2, 3, 32, 32)]), "allocate='global'"),
    (dict(params_fraction=1.5, calibration=[torch.zeros(2, 3, 32, 32)], allocate="global"), r"in \(0, 1\)"),
    (dict(params_fraction=0.01, calibration=[torch.rand(4, 3, 32, 32)], allocate="global"), "smallest cut allowed"),
    (dict(mlp_ratio=1, heads=2, params_fraction=0.5, calibration=[torch.zeros(2, 3, 32, 32)], allocate="global"),
     "nothing to spend"),
    (dict(heads=2, criterion="diversity-act"), "it needs calibration images"),
    (dict(mlp_ratio=99, heads=2), "cannot keep 19008 of 768"),
])
def test_bad_head_requests_leave_the_model_whole(kwargs, match, cfgdir):
    model, src = build(CASES[0], cfgdir)
    before = _state(model)
    with pytest.raises(dgmr.DgmrError, match=match):
        dgmr.prune(model, progress=False, source=src, **kwargs)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("case", REFUSED_HEAD_CASES, ids=lambda c: c.id)
def test_layouts_dgmr_cannot_cut_are_refused(case, cfgdir):
    try:
        model, src = build(case, cfgdir)
    except dgmr.DgmrError as e:  # a layout the oldest supported timm does not have (num_kv_heads)
        if "unexpected keyword argument" not in str(e):
            raise
        pytest.skip(str(e))
    before = _state(model)
    with pytest.raises(dgmr.DgmrError, match="grouped-query|shared by all blocks"):
        dgmr.prune(model, mlp_ratio=1, heads=1, progress=False, source=src)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    dgmr.prune(model, mlp_ratio=1, heads=family_of(model).attention(model)[0].heads, progress=False)  # all kept: fine


def test_cli_bad_head_input_is_one_line(cli, tmp_path):
    convnext = ["timm:convnext_atto", "--random-init", "--model-kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}']
    for argv, match in [((*TINY_VIT_ARGV, "--heads", "0"), "cannot keep 0 of 3"),
                        ((*TINY_VIT_ARGV, "--mlp-ratio", "1", "--heads", "7"), "cannot keep 7 of 3"),
                        ((*TINY_VIT_ARGV, "--head-fraction", "0.1"), "= 0 of its 3 heads"),
                        ((*convnext, "--heads", "1"), "no attention layer dgmr recognises"),
                        ((*TINY_VIT_ARGV, "--heads", "1", "--criterion", "diversity-act"), "diversity-act")]:
        out = tmp_path / "o"
        code, _, err = cli("prune", *argv, "--out", out)
        assert code == 2 and err.startswith("dgmr: error:") and err.count("\n") == 1 and match in err, err
        assert not out.exists()


# -- the rest of the pipeline -------------------------------------------------------------
def test_flops_are_the_same_on_every_device(cfgdir):
    """The fused CPU attention kernel and nn.MultiheadAttention's fused path are counted: a
    model's FLOPs on the CPU equal its FLOPs on meta (where torch runs the plain products)."""
    for case in [c for c in CASES if c.id != "open_clip_timm_tower"] + HEAD_CASES:
        model, _ = build(case, cfgdir)
        fam = family_of(model)
        assert count_flops(model, fam, case.image_size) == count_flops(copy.deepcopy(model).to("meta"), fam,
                                                                      case.image_size), case.id


@pytest.mark.cuda
def test_flops_on_cuda_equal_meta(cfgdir):
    """On a GPU torch runs its flash / memory-efficient kernels and nn.MultiheadAttention's fused
    path: the count is still the meta one, cut heads or not."""
    for case_id in ("timm_vit", "timm_eva02_glu", "open_clip_vit", "hf_vit", "hf_siglip_vision"):
        case = next(c for c in CASES if c.id == case_id)
        model, _ = build(case, cfgdir)
        fam = family_of(model)
        for cut in (False, True):
            if cut:
                dgmr.prune(model, heads=1, progress=False)
            want = count_flops(copy.deepcopy(model).to("meta"), fam, case.image_size)
            for dtype in (torch.float32, torch.bfloat16):
                gpu = copy.deepcopy(model).to("cuda", dtype)
                assert count_flops(gpu, fam, case.image_size) == want, (case_id, cut, dtype)


def test_head_flops_and_stats(cli, tmp_path):
    """vit_tiny at 32 px (17 tokens, 3 heads of 64, width 192, 2 blocks) keeping 1 head: the
    qkv rows, proj columns and attention matmuls of 2 heads go, counted alike by stats and by
    the CPU measurement."""
    n, d, hd, cut = 17, 192, 64, 2
    removed = 2 * (2 * n * d * 3 * cut * hd + 2 * n * cut * hd * d + 4 * n * n * hd * cut)
    spec = [TINY_VIT_SPEC, "--model-kwargs", json.dumps(TINY_VIT_KWARGS)]
    code, out, err = cli("stats", *spec, "--heads", "1", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["flops_before"] - s["flops_after"] == removed and s["heads_before"] == [3] and s["heads_after"] == [1]
    assert s["attention_params_before"] - s["attention_params_after"] == 2 * cut * hd * (3 * (d + 1) + d)
    code, _, err = cli("prune", *TINY_VIT_ARGV, "--heads", "1", "--out", tmp_path / "p", "--json")
    assert code == 0, err
    code, out, err = cli("stats", tmp_path / "p", "--json")
    assert code == 0 and json.loads(out)["flops_after"] == s["flops_after"], err
    from dgmr.evaluate.speed import measure_speed

    res = measure_speed({"a": dgmr.load(tmp_path / "p")}, batch_size=1, repeats=1, warmup=0, device="cpu")
    assert res["models"]["a"]["flops"] == s["flops_after"]


@pytest.mark.parametrize("case_id", ["timm_vit", "open_clip_vit", "hf_clip"])
def test_stream_and_import_cut_heads_like_prune(case_id, cfgdir, tmp_path):
    from dgmr.prune.stream import stream_prune

    case = next(c for c in CASES if c.id == case_id)
    model, src = build(case, cfgdir)
    dgmr.save(model, tmp_path / "orig", source=src, native=False)
    r = stream_prune(src, tmp_path / "orig" / "model.safetensors", tmp_path / "stream", mlp_ratio=1.0, heads=1,
                     criterion="l2", progress=False)
    pruned, rec = dgmr.prune(model, mlp_ratio=1.0, heads=1, criterion="l2", progress=False, source=src)
    a, b = dgmr.load(tmp_path / "stream").state_dict(), pruned.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert r["heads_after"] == [1]
    kept = artifact.load_kept_indices(tmp_path / "stream")
    assert all(torch.equal(kept[n], k) for n, k in rec.kept_heads.items())
    dgmr.save(pruned, tmp_path / "mem", source=src, native=False)
    dgmr.import_checkpoint(src, tmp_path / "mem" / "model.safetensors", tmp_path / "imported", native=False)
    cfg = json.loads((tmp_path / "imported" / "dgmr.json").read_text())
    assert set(cfg["heads"].values()) == {1}
    c = dgmr.load(tmp_path / "imported").state_dict()
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_import_refuses_inconsistent_head_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    model, src = build(CASES[0], None)
    pruned, _ = dgmr.prune(model, heads=2, progress=False, source=src)
    dgmr.save(pruned, tmp_path / "p", source=src, native=False)
    sd = load_file(str(tmp_path / "p" / "model.safetensors"))
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"][:, :64].contiguous()
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(dgmr.DgmrError, match="output projection columns of blocks.0.attn"):
        dgmr.import_checkpoint(src, tmp_path / "bad.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_distill_and_eval_take_a_head_pruned_student(cli, tmp_path):
    from dgmr.distill.pair import check_pair
    from helpers import image_folder

    assert cli("prune", *TINY_VIT_ARGV, "--keep-fraction", "1", "--out", tmp_path / "teacher", "--json")[0] == 0
    assert cli("prune", tmp_path / "teacher", "--mlp-ratio", "1", "--heads", "2", "--out", tmp_path / "student",
               "--json")[0] == 0
    teacher, student = dgmr.load(tmp_path / "teacher"), dgmr.load(tmp_path / "student")
    check_pair(teacher, student)
    all_heads = dgmr.prune(copy.deepcopy(teacher), mlp_ratio=1, progress=False)[0]
    with pytest.raises(dgmr.DgmrError, match="more attention heads than the teacher"):
        check_pair(student, all_heads)
    image_folder(tmp_path / "images", ["a", "b"], 4, style="noise", size=(36, 36))
    code, _, err = cli("distill", "--teacher", tmp_path / "teacher", "--student", tmp_path / "student", "--data",
                       tmp_path / "images", "--out", tmp_path / "run", "--steps", "2", "--batch-size", "4",
                       "--workers", "0", "--device", "cpu", "--json")
    assert code == 0, err
    trained = dgmr.load(tmp_path / "run")
    assert [s.heads for s in family_of(trained).attention(trained)] == [2, 2]
    code, out, err = cli("eval", "speed", tmp_path / "teacher", tmp_path / "run", "--batch-size", "2", "--repeats", "1",
                         "--warmup", "0", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["flops_ratio"] > 1 and res["params_ratio"] > 1


def test_register_attention_kind_user_first(cfgdir):
    """A kind a user registers is tried before the built-ins (here: timm's Attention under
    another name, with its width attribute left out: the cut then sets only the head count)."""
    from dgmr.models.sites.attention import ATTENTION_KINDS, register_attention_kind

    @register_attention_kind("my-timm-attention")
    def mine(path, module):
        site = ATTENTION_KINDS["timm_attention"](path, module)
        if site is not None:
            site.kind, site.width_attrs = "my-timm-attention", ()
        return site

    try:
        model, _ = build(CASES[0], cfgdir)
        assert {s.kind for s in family_of(model).attention(model)} == {"my-timm-attention"}
        with pytest.raises(dgmr.DgmrError, match="already registered"):
            register_attention_kind("torch_mha")(mine)
        _, rec = dgmr.prune(model, heads=2, progress=False)
        assert model.blocks[0].attn.num_heads == 2 and model.blocks[0].attn.attn_dim == 192  # left as it was
        assert rec.heads[0]["kind"] == "my-timm-attention"
    finally:
        ATTENTION_KINDS.remove("my-timm-attention")


def test_pooling_head_attention_is_never_cut():
    """timm's MAP pooling head (attn_pool, an attention of its own) is left whole, as its MLP is."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="map").eval()
    fam = family_of(model)
    assert [s.name for s in fam.attention(model)] == ["blocks.0.attn", "blocks.1.attn"]
    pool = copy.deepcopy(model.attn_pool.state_dict())
    dgmr.prune(model, heads=1, progress=False)
    assert all(torch.equal(t, pool[k]) for k, t in model.attn_pool.state_dict().items())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
