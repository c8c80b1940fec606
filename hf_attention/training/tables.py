"""The one GitHub-markdown table writer for reports, model cards, CLIs and benchmarks.

Cells are written with ``str`` and not escaped: callers format numbers (and escape a literal ``|``)
themselves, since what a cell should look like depends on the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["ALIGNMENTS", "markdown_row", "markdown_table"]

# Separator cell per column alignment; None (or "") keeps the renderer's default (left).
ALIGNMENTS = {None: "---", "": "---", "left": ":---", "right": "---:", "center": ":---:"}


def markdown_row(cells: Iterable[object]) -> str:
    """One table line, ``| a | b |``: for tables printed a row at a time (slow benchmarks stream)."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(
    headers: Sequence[object], rows: Iterable[Sequence[object]], align: Sequence[str | None] | None = None
) -> str:
    """Header line, separator line and one line per row, joined by newlines (no trailing newline).

    ``align`` gives each column's alignment ("left", "right", "center" or None for the default);
    ``rows`` may be empty, which writes just the header for a caller that prints rows with `markdown_row`.
    """
    if align is None:
        align = [None] * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    unknown = [a for a in align if a not in ALIGNMENTS]
    if unknown:
        raise ValueError(f"unknown alignment {unknown[0]!r}; choose one of 'left', 'right', 'center' or None")
    lines = [markdown_row(headers), "|" + "|".join(ALIGNMENTS[a] for a in align) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {list(row)!r}")
        lines.append(markdown_row(row))
    return "\n".join(lines)
