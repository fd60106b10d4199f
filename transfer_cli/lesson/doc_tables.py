"""The quick-mode tables of docs/exercises.md, rewritten from the files `make exerciseN QUICK=1` wrote.

The document marks each table with the file it comes from, `<!-- table: ex3/results.md -->` on the line
before and `<!-- /table -->` on the line after; `splice` replaces what lies between with that file
(`results.md`, `epochs.md` of `transfer report`), the assets folder written as `$ASSETS`, so the numbers in
the docs are the numbers the targets print. Another machine's kernels may round an image differently: the
first marker records where the tables were made (`<!-- tables made on torch ..., AVX2, x86_64 -->`).
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import write_text


BLOCK = re.compile(r"(<!-- table: (?P<file>\S+) -->\n)(?P<body>(?:(?!<!-- table: ).)*?)(<!-- /table -->)", re.S)
MADE_ON = re.compile(r"<!-- tables made on [^>]*-->")


def machine() -> str:
    """What decides how the tables' numbers round: torch, its CPU kernels, the architecture."""
    import torch

    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {platform.machine()}"


def splice(document: str, source: Path, assets: str | None = None, made_on: str | None = None) -> str:
    """`document` with every marked table replaced by its file under `source`; one line naming the first file
    that is missing, before anything is written."""
    if not BLOCK.search(document):
        raise TransferError("the document marks no table: put <!-- table: exN/results.md --> before and "
                            "<!-- /table --> after each one")

    def table(match: re.Match[str]) -> str:
        return f"{match[1]}{table_text(source, match['file'], assets)}\n{match[4]}"

    spliced = BLOCK.sub(table, document)
    return MADE_ON.sub(f"<!-- tables made on {made_on} -->", spliced) if made_on else spliced


def table_text(source: Path, file: str, assets: str | None = None) -> str:
    """The table `file` (relative to `source`) as the document shows it: the assets folder written `$ASSETS`."""
    path = source / file
    if not path.is_file():
        folder = file.split("/")[0]
        hint = f" (make {folder.replace('ex', 'exercise')} QUICK=1)" if re.fullmatch(r"ex\d", folder) else ""
        raise TransferError(f"{path} does not exist: run what writes it first{hint}")
    text = path.read_text(encoding="utf-8").strip()
    if assets:
        text = text.replace(str(Path(assets).expanduser().resolve()), "$ASSETS").replace(assets, "$ASSETS")
    return text


def tables(document: str) -> dict[str, str]:
    """Each marked table of `document` by the file it comes from."""
    return {match["file"]: match["body"].rstrip("\n") for match in BLOCK.finditer(document)}


def made_on(document: str) -> str | None:
    """The machine the document's tables were made on, as its marker says."""
    found = MADE_ON.search(document)
    return found.group(0)[len("<!-- tables made on "):-len(" -->")] if found else None


def rewrite(doc: Path, source: Path, assets: str | None) -> list[str]:
    """Splice the tables of `source` into `doc` in place (all or nothing); return the files used."""
    if not doc.is_file():
        raise TransferError(f"{doc} does not exist: give the document to rewrite with --into")
    document = doc.read_text(encoding="utf-8")
    write_text(doc, splice(document, source, assets, machine()))
    return list(tables(document))
