"""Conformance: the model checks timm, open_clip and transformers run on their own models, run
on dgmr's pruned outputs of every family in tiny_models.py.

Each case is pruned, saved with ``dgmr.save`` and reloaded twice: through ``dgmr.load`` and
through the source library's own loader (:func:`library_load`; none for the architectures
whose library config cannot express pruned widths, timm's ConvNeXt and MetaFormer, and for
models of no known library). Every reload must give the in-memory pruned model's output,
and pass what the library's own test suite asks of its models:

* forward and backward (timm ``test_model_forward``/``_backward``; the parameters that get a
  gradient are the original's);
* torchscript (``torch.jit.script``: timm, open_clip), fx (timm's feature-extraction tracer),
  each giving the eager output (transformers 5 has dropped both: no such check there);
* ``torch.export`` (timm, open_clip's tower, transformers' ``test_torch_export``), giving the
  eager output;
* ``torch.compile(fullgraph=True)`` (timm's compile test; open_clip's tower and transformers'
  vision output alike) on the ``dgmr.load`` reload, giving the eager output (all the
  originals pass it: checked once by hand, 2026-12-07, not in the suite, for its time);
* intermediates: timm's ``forward_intermediates`` and ``features_only`` (the library loading the
  pruned weights itself), open_clip's ``forward_intermediates``, transformers'
  ``output_hidden_states``, of the original's shapes.

The checks run on the pruned reloads, and the cheap ones on the original as well, which must
pass them too.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import dgmr
from dgmr.models.families import family_of

from tiny_models import CASES, Case, GenericNet, build, output

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-4, atol=1e-5)  # a traced, scripted or exported program against eager
SAME = dict(rtol=1e-5, atol=1e-6)  # one model against another with the same weights (memory layouts may differ)


def library_load(out: Path, **overrides: Any) -> nn.Module | None:
    """``out`` (a dgmr directory) as its source library loads it by itself, following what the
    directory documents; ``overrides`` go to the library's constructor (timm's
    ``features_only=True``). None where the directory says no library config expresses the
    pruned widths. The one place that knows the output layout (today ``config.json``'s
    ``native_export.load``, a line of the library's own API with DIR for the directory)."""
    import open_clip
    import timm
    import transformers

    note = json.loads((out / "config.json").read_text())["native_export"]
    if "skipped" in note:
        return None
    code = note["load"].split(";")[0].replace("DIR", str(out))  # the open_clip tower's note goes on in prose
    code, _, reset = code.partition(".reset_classifier(")
    shim = SimpleNamespace(create_model=functools.partial(timm.create_model, **overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = eval(code, {"timm": shim, "open_clip": open_clip, "transformers": transformers})  # noqa: S307 - our own note
    if reset:
        eval(f"model.reset_classifier({reset}", {"model": model})  # noqa: S307
    return model.eval()


# ---------------------------------------------------------------------------------------------
# inputs and outputs


def _inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a transformers model's forward takes (a CLIPModel wants token ids too)."""
    if hasattr(model, "text_model"):
        return {"pixel_values": x, "input_ids": torch.arange(14).reshape(2, 7) % 50 + 1}
    return {"pixel_values": x}


class VisionOutput(nn.Module):
    """The vision output of a whole model as a module of one tensor input (what torch.export and
    tracing take): open_clip's ``encode_image``, a transformers model's first output."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "open_clip":
            return self.model.encode_image(x)
        out = self.model(**_inputs(self.model, x))
        out = out.vision_model_output if hasattr(out, "vision_model_output") else out
        return out.last_hidden_state


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return output(family_of(model), model, x)


def _grads(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters that get a gradient from the model's vision output (the library
    tests' backward: every parameter in use gets one)."""
    model.train()
    model.zero_grad(set_to_none=True)
    output(family_of(model), model, x).float().mean().backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and torch.isfinite(p.grad).all()}
    model.zero_grad(set_to_none=True)
    model.eval()
    return names


# ---------------------------------------------------------------------------------------------
# the checks of each library


def _script(model: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
        return scripted.encode_image(x) if kind == "open_clip" else scripted(x)


def _fx(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's test_model_forward_fx: its tracer (timm's leaf modules) up to the last node."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    last = get_graph_node_names(model)[1][-1]
    with torch.no_grad():
        return create_feature_extractor(model, return_nodes=[last])(x)[last]


def _export(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,)).module()(x)


def _compiled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's torch.compile check: the whole forward in one graph (``fullgraph=True``: a graph
    break fails). Dynamo's capture runs with the eager backend; inductor's code generation (a
    C++ compiler, minutes per model on a CPU) is not what a pruned width could break."""
    torch._dynamo.reset()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.compile(model, fullgraph=True, backend="eager")(x)


def _intermediate_shapes(model: nn.Module, x: torch.Tensor, kind: str) -> list[tuple[int, ...]]:
    with torch.no_grad():
        if kind == "timm":
            out = model.forward_intermediates(x, indices=1, intermediates_only=True)
        elif kind == "open_clip":
            out = model.forward_intermediates(image=x, image_indices=1, intermediates_only=True)["image_intermediates"]
        else:
            res = model(**_inputs(model, x), output_hidden_states=True)
            out = (res.vision_model_output if hasattr(res, "vision_model_output") else res).hidden_states
    return [tuple(t.shape) for t in out]


def _checks(kind: str, model: nn.Module, x: torch.Tensor, original: nn.Module | None) -> None:
    """The library's checks on ``model``: each transformed model gives its eager output; with
    ``original``, the same checks pass on it and the intermediates have its shapes."""
    for m in ([model] if original is None else [model, original]):
        y = _eager(m, x)
        assert torch.isfinite(y).all()
        if kind in ("timm", "open_clip", "generic"):
            torch.testing.assert_close(_script(m, x, kind), y, **TOL)
        if kind == "timm":
            torch.testing.assert_close(_fx(m, x), m(x), **TOL)
    if original is not None and kind != "generic":
        assert _intermediate_shapes(model, x, kind) == _intermediate_shapes(original, x, kind)


# ---------------------------------------------------------------------------------------------
# the cases


def _width(case: Case) -> dict[str, Any]:
    # HF Dinov2Config.mlp_ratio is an int: its SwiGLU width int(int(d*r)*2/3) rounded up to 8 is 64 at r=3
    return dict(hidden=64) if case.id == "hf_dinov2_swiglu" else dict(mlp_ratio=1.0)


@pytest.fixture(scope="module")
def cfgdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conformance_cfg")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pruned_outputs_pass_the_library_checks(case, cfgdir, tmp_path):
    original, src = build(case, cfgdir)
    pruned, record = build(case, cfgdir)
    pruned, record = dgmr.prune(pruned, **_width(case), progress=False, source=src)
    out = tmp_path / "pruned"
    dgmr.save(pruned, out, source=src, record=record)
    kind = case.family
    x = torch.randn(2, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(0))
    expected = _eager(pruned, x)

    loaded = dgmr.load(out, model=GenericNet() if src is None else None)
    torch.testing.assert_close(_eager(loaded, x), expected, **SAME)
    assert _grads(loaded, x) == _grads(original, x)
    _checks(kind, loaded, x, original)
    vision = loaded if kind in ("timm", "generic") else VisionOutput(loaded, kind)
    torch.testing.assert_close(_export(vision, x), expected, **TOL)
    torch.testing.assert_close(_compiled(vision, x), expected, **TOL)

    native = library_load(out)
    if kind == "generic" or not case.native:  # no library config expresses these widths: the note says so
        assert native is None
        return
    assert native is not None
    if case.id == "open_clip_timm_tower":  # the library loads the pruned timm trunk: timm's checks on it
        torch.testing.assert_close(native(x), loaded.visual.trunk(x), **SAME)
        _checks("timm", native, x, None)  # on the original too would cost 5 s at 224 px: the EVA02 cases run them
        assert _grads(native, x) == {n.removeprefix("visual.trunk.") for n in _grads(original, x)
                                     if n.startswith("visual.trunk.")}
        return
    torch.testing.assert_close(_eager(native, x), expected, **SAME)
    assert _grads(native, x) == _grads(original, x)
    _checks(kind, native, x, None)
    if kind == "hf":  # transformers' test_torch_export runs on the from_pretrained model
        torch.testing.assert_close(_export(VisionOutput(native, kind), x), expected, **TOL)
    if kind == "timm":  # features_only: timm builds its feature wrapper and loads the pruned weights itself
        features = library_load(out, features_only=True, out_indices=(1,))
        with torch.no_grad():
            got = features(x)
            want = loaded.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert len(got) == len(want) == 1
        if getattr(features, "output_fmt", "NCHW") == "NHWC":  # Swin's feature maps are channels-last
            got = [t.permute(0, 3, 1, 2) for t in got]
        torch.testing.assert_close(got[0], want[0], **SAME)
