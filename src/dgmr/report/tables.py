"""Tables as Markdown and as aligned terminal text, and the number formats they use."""
from __future__ import annotations

from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int | None = None) -> list[str]:
    """Lines of a Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned plain-text table: the first column left-aligned, the others right-aligned."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for j, r in enumerate(table):
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_count(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (k, M, G, T); None -> '–'."""
    if n is None:
        return "–"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:.0f}{unit}"


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * v:.1f}"
