"""Writing files: whole or not at all (`atomic_file`), never through a symbolic link (`append_own`, `open_own`),
and CSV cells a spreadsheet shows as text rather than runs as formulas (`csv_cell`).

`atomic_file` renames a temp file over its target, which replaces a symbolic link there rather
than following it; it creates the temp file in the target's folder as the caller names it (an
`--out` folder may well be a link the user made). A run directory's own entries are checked for
links where the directory is locked for writing (runs/runlock.py), before any of them is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from transfer_cli.core.errors import TransferError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: the temp file's 0600 would leak otherwise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write `path` through: a temp file beside it (`.<name>.<random>.tmp`), flushed, fsynced and
    renamed over `path` when the block ends; removed when the block raises. A kill between writing and
    renaming leaves the temp file, which `remove_temp_files` clears the next time the folder is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, FILE_MODE)
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """`path` holds its old content or all of `text`."""
    with atomic_file(path) as file:
        file.write(text)


def remove_temp_files(folder: Path, targets: tuple[str, ...]) -> list[Path]:
    """Delete the temp files `atomic_file` left in `folder` for the files named by `targets` (glob patterns) when a
    kill (SIGKILL) interrupted it; returns them. Any other file is left alone: a folder the user gave may hold
    dot-files of their own.

    Only for a folder one process writes (a run directory, under its lock): in a shared folder
    another process's temp file may still be in the making.
    """
    if not folder.is_dir():
        return []
    found = sorted({path for target in targets for path in folder.glob(f".{target}.*.tmp")
                    if TEMP_NAME.fullmatch(path.name) and not path.is_symlink() and path.is_file()})
    for path in found:
        path.unlink(missing_ok=True)
    return found


TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # `.<target>.<mkstemp's 8 random characters>.tmp`


class NotOwnFile(TransferError):
    """A run directory's entry that is a symbolic link (or no plain file): writing through it would change
    something outside the run directory."""


def link_problem(path: Path) -> str:
    return f"{path} is a symbolic link: a run directory's files must be its own; remove the link"


def open_own(path: Path, flags: int) -> int:
    """`os.open(path, flags)` that never follows a symbolic link at `path` and opens only a plain file (a FIFO
    would block, a device would be written): anything else is a NotOwnFile line."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotOwnFile(link_problem(path)) from None
        if error.errno not in (errno.ENXIO, errno.EISDIR):  # ENXIO: a FIFO without a reader
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise NotOwnFile(f"{path} is not a plain file: a run directory's files must be its own; remove it")
    return fd


def refuse_links_below(root: Path, path: Path) -> None:
    """NotOwnFile where a folder between `root` (a run directory) and `path` inside it, or `path`, is a symbolic
    link: writing there would change files elsewhere."""
    inside = Path(path).relative_to(root)
    for depth in range(1, len(inside.parts) + 1):
        entry = root.joinpath(*inside.parts[:depth])
        if entry.is_symlink():
            raise NotOwnFile(link_problem(entry))


def append_own(path: Path) -> IO[str]:
    """`path` opened to append text (created if missing), never through a symbolic link."""
    return os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """`value` as a CSV cell no spreadsheet runs as a formula: text that starts like one (= + - @, a tab, a CR) gets
    a leading single quote, as careful CSV writers do; numbers, and text that is a plain number, stay as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value
