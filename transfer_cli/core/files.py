"""Writing a file so that a reader sees its old content or all of the new one, never a part of it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files `atomic_file` leaves in `folder` when a kill (SIGKILL) interrupts it; returns them.

    Only for a folder one process writes (a run directory, under its lock): in a shared folder
    another process's temp file may still be in the making.
    """
    found = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found
