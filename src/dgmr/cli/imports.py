"""The ``import`` sub-command (see :func:`dgmr.prune.importer.import_checkpoint`)."""
from __future__ import annotations

import argparse
from typing import Any

from .args import model_kwargs_arg


def _import(args: argparse.Namespace) -> dict[str, Any]:
    from ..prune.importer import import_checkpoint

    return import_checkpoint(args.spec, args.checkpoint, args.out, model_kwargs=args.model_kwargs, dtype=args.dtype,
                             overwrite=args.overwrite, native=not args.no_native)


def register(sub: argparse._SubParsersAction) -> None:
    from ..core.dtypes import DTYPES

    p = sub.add_parser(
        "import", help="make a dgmr directory from a checkpoint whose MLPs were pruned elsewhere",
        description="Read a state dict with narrower MLPs (e.g. the DGMR paper's released distill.pth files) and "
                    "write it as a dgmr directory, exactly as `dgmr prune` would: model.safetensors, the "
                    "source library's own config files, dgmr.json and a model card. SPEC names the original architecture; each MLP's hidden "
                    "width is read from the tensor shapes. Names in the library's convention, or in a naming its "
                    "checkpoint filter converts (timm: original EVA-CLIP `mlp.w1/w2/w3/ffn_ln`, original DINOv2 "
                    "`mlp.w12/w3`, open_clip), are accepted; a whole model or the vision tower alone. The criterion "
                    "and the kept neuron indices are unknown: no kept indices are written and dgmr.json "
                    "records criterion 'unknown' and where the weights came from ('imported_from'). Pickles are "
                    "read only with torch.load(weights_only=True), memory-mapped; one that would run code is refused.")
    p.add_argument("spec", metavar="SPEC", help="the original architecture: timm:NAME, open_clip:ARCH or hf:REPO_OR_DIR "
                                                "(only its shapes are built: nothing is downloaded but configs)")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .safetensors file, model.safetensors.index.json or a directory holding one, or a torch "
                        "pickle (.pth/.pt/.bin/.ckpt/.pkl) with a state dict, possibly nested under "
                        "model/state_dict/module/model_ema and with a module. prefix")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model-kwargs", type=model_kwargs_arg, default=None, metavar="JSON",
                   help="extra architecture arguments (timm create_model kwargs, open_clip create_model kwargs, "
                        "HF config overrides), as for `dgmr prune`")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the saved floating weights (default: as in the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-native", action="store_true", help="skip the export in the source library's own format")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_import)
