"""matplotlib for files only: every figure the tool draws goes to a PNG, never to a window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cli.core.files import atomic_file


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed; imported only by what draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = 100) -> None:
    """`figure` as a PNG at `path`, written whole or not at all (see files.py), then closed."""
    with atomic_file(path, "wb") as file:
        figure.savefig(file, dpi=dpi, format="png")
    pyplot().close(figure)
