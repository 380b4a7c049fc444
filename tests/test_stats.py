"""Params/FLOPs on the meta device reproduce method.md section 3 for the real architectures."""
from __future__ import annotations

import pytest

from dgmr.prune.stats import stats


@pytest.mark.parametrize("spec,ratio,reduction,params_b", [
    ("open_clip:EVA02-E-14-plus", 1.0, 0.716, 4.35),
    ("open_clip:EVA02-E-14-plus", 2.0, 0.621, 4.35),
    ("open_clip:ViT-g-14", 1.0, 0.527, 1.01),
    ("open_clip:ViT-g-14", 2.0, 0.370, 1.01),
    ("open_clip:ViT-bigG-14", 1.0, 0.565, 1.84),
    ("open_clip:ViT-bigG-14", 2.0, 0.421, 1.84),
    ("timm:vit_giant_patch14_dinov2", 1.0, 0.4154, 1.14),  # method.md rounds this to 41.6%
])
def test_param_reduction_matches_method(spec, ratio, reduction, params_b):
    s = stats(spec, mlp_ratio=ratio)
    assert s["params_before"] / 1e9 == pytest.approx(params_b, abs=0.005)
    assert s["param_reduction"] == pytest.approx(reduction, abs=0.0006)
    assert 0 < s["flop_reduction"] < 1 and s["flops_after"] < s["flops_before"]


def test_eva_e_flops_at_224():
    s = stats("open_clip:EVA02-E-14-plus", mlp_ratio=1.0, image_size=224)
    assert s["flops_before"] / 1e12 == pytest.approx(2.26, abs=0.01)
    assert s["flops_after"] / 1e12 == pytest.approx(0.66, abs=0.01)
