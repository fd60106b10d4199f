"""Atomic writes (core/files.py): a reader sees the old file or the whole new one, with the umask's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from transfer_cli.core.files import atomic_file, remove_temp_files, write_text
from transfer_cli.runs.checkpoint import save_atomic


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as file:
        file.write("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_killed_writes_temp_file_is_cleared_and_only_its_temp_files(tmp_path: Path) -> None:
    (tmp_path / ".last.pt.ab12cd34.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    users = [".draft.tmp", ".thesis.docx.tmp", ".notes.ab12cd34.tmp", ".last.pt.tmp"]  # not temp files of a target
    for name in users:
        (tmp_path / name).write_text("the user's")
    assert [p.name for p in remove_temp_files(tmp_path, ("last.pt", "best.pt"))] == [".last.pt.ab12cd34.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", *users])


def test_checkpoints_and_text_files_follow_the_umask_not_0600(tmp_path: Path) -> None:
    expected = 0o666 & ~umask()
    save_atomic({"weights": torch.zeros(2)}, tmp_path / "checkpoints" / "best.pt")
    write_text(tmp_path / "metrics.json", "{}")
    for path in (tmp_path / "checkpoints" / "best.pt", tmp_path / "metrics.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert (tmp_path / "metrics.json").read_text() == "{}"
