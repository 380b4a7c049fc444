"""The ``card`` sub-command (see :func:`dgmr.report.card.write_card`)."""
from __future__ import annotations

import argparse
from typing import Any


def _card(args: argparse.Namespace) -> dict[str, Any]:
    from ..report.card import write_card

    return write_card(args.dir, args.results or ())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card", help="write a dgmr directory's model card (README.md) again, with evaluation results",
        description="Render the model card (README.md, Hugging Face conventions: library_name, tags, base_model, "
                    "license, pipeline_tag) of a dgmr directory from its record (dgmr.json), adding the results of "
                    "`dgmr eval ... --save FILE` (or clip_benchmark result files) of that directory in the card's "
                    "model-index. A directory that is not a dgmr output, a results file that does not parse, or "
                    "results of another model are an error, and the card is left as it was.")
    p.add_argument("dir", metavar="DIR", help="a directory dgmr wrote (dgmr prune, import, distill)")
    p.add_argument("--results", nargs="+", metavar="FILE", help="evaluation results of DIR (JSON)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_card)
