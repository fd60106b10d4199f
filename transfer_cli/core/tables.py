"""The tables the commands print and write: aligned plain text for a terminal, markdown for files."""

from __future__ import annotations

from collections.abc import Sequence


def aligned(rows: Sequence[Sequence[str]], right: Sequence[int] = (), min_widths: dict[int, int] | None = None) -> str:
    """Columns two spaces apart, each as wide as its widest cell (or `min_widths[column]`); the columns in
    `right` are right-aligned (numbers), the rest left-aligned; no trailing spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for column, width in (min_widths or {}).items():
        widths[column] = max(widths[column], width)

    def cell(text: str, column: int) -> str:
        return text.rjust(widths[column]) if column in right else text.ljust(widths[column])

    return "\n".join("  ".join(cell(text, i) for i, text in enumerate(row)).rstrip() for row in rows)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown pipe table; a `|` or a line break inside a cell is escaped, so each cell stays one cell."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(text.replace("|", "\\|").replace("\n", " ") for text in line) + " |"
                     for line in lines)
