"""`transfer train dry_run=true` with a torchvision set not downloaded and no network: the plan says what would be
downloaded where, and nothing is created (no empty dataset folder left behind)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from transfer_cli.cli import main


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data cache that does not exist yet, and every connection refused; the cache's path."""
    data = tmp_path / "data"
    monkeypatch.setenv("TRANSFER_DATA", str(data))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a dry run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return data


def test_the_default_dataset_is_reported_not_downloaded_and_nothing_is_created(
        offline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], hydra_in_process: None) -> None:
    assert main(["train", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert f"dataset   flowers102: not downloaded (would download about 345 MB to {offline})" in out
    assert "1020 train / 1020 val images" in out and "102 classes" in out
    assert not offline.exists(), "a dry run created the data folder"
    assert not (tmp_path / "run").exists()


def test_a_split_the_set_does_not_have_is_one_line(offline: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], hydra_in_process: None) -> None:
    assert main(["train", "dry_run=true", "dataset.val_split=holdout", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert "dataset.val_split=holdout: flowers102 has the splits train, val, test" in capsys.readouterr().err
    assert not offline.exists()
