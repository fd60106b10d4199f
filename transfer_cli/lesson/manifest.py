"""Manifests of the quick-mode data sets: every file's sha256, its path in the set and its name in
the archive it comes from, so a fetched set can be proven to be exactly the one the docs measured.

A manifest is a text file, one file per line, tab-separated: `sha256<TAB>path<TAB>archive member`
(paths may hold spaces). `python -m transfer_cli.lesson.manifest ASSETS` writes the shipped
manifests from local copies of the sets (ASSETS/data/hymenoptera, ASSETS/data/eurosat5).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import write_text


MANIFESTS = Path(__file__).resolve().parent / "manifests"
NOT_IN_SETS = {"PROVENANCE.txt"}  # notes beside the local copies, not part of the sets


@dataclass(frozen=True)
class Entry:
    sha256: str
    path: str  # relative to the set's folder, "/"-separated
    member: str  # the file's name in the downloaded archive


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_files(folder: Path) -> list[str]:
    """Every file below `folder` (relative, sorted), the notes in NOT_IN_SETS left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in NOT_IN_SETS)


def build_manifest(folder: Path, member_of: Callable[[str], str]) -> list[Entry]:
    """The manifest of the set in `folder`; `member_of(path)` names each file in the source archive."""
    return [Entry(sha256_of(folder / path), path, member_of(path)) for path in set_files(folder)]


def format_manifest(entries: list[Entry]) -> str:
    return "".join(f"{e.sha256}\t{e.path}\t{e.member}\n" for e in entries)


def read_manifest(path: Path) -> list[Entry]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TransferError(f"cannot read the manifest {path} ({exc.strerror}): reinstall the package") from None
    entries = [Entry(*line.split("\t")) for line in lines if line.count("\t") == 2]
    if not entries or len(entries) != len(lines):
        raise TransferError(f"the manifest {path} is damaged: reinstall the package")
    return entries


def mismatch(folder: Path, entries: list[Entry]) -> str | None:
    """Why `folder` is not exactly the manifest's set (a missing, changed or extra file), or None."""
    expected = {e.path: e.sha256 for e in entries}
    found = set_files(folder) if folder.is_dir() else []
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"{extra[0]} is not in the manifest"
    for path, sha256 in expected.items():
        if path not in found:
            return f"{path} is missing"
        if sha256_of(folder / path) != sha256:
            return f"{path} has sha256 {sha256_of(folder / path)[:12]}..., the manifest {sha256[:12]}..."
    return None


# The archive member of each file of a local copy: how the sets were taken from their sources.
MEMBER_OF: dict[str, Callable[[str], str]] = {
    # hymenoptera_data.zip holds hymenoptera_data/{train,val}/{ants,bees}/*
    "hymenoptera": lambda path: f"hymenoptera_data/{path}",
    # EuroSAT.zip holds 2750/<Class>/<Class>_<n>.jpg; eurosat5 splits the first 60 of 5 classes 42/18
    "eurosat5": lambda path: "2750/" + "/".join(path.split("/")[1:]),
}


def write_manifests(assets: Path, out: Path = MANIFESTS) -> list[Path]:
    """Write `<name>.tsv` for every set in MEMBER_OF from ASSETS/data/<name>; returns the files written."""
    written = []
    for name, member_of in MEMBER_OF.items():
        folder = assets / "data" / name
        if not folder.is_dir():
            raise TransferError(f"{folder} is not a directory: give the folder that holds data/{name}")
        write_text(out / f"{name}.tsv", format_manifest(build_manifest(folder, member_of)))
        written.append(out / f"{name}.tsv")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m transfer_cli.lesson.manifest ASSETS")
    for manifest in write_manifests(Path(sys.argv[1])):
        print(manifest)
