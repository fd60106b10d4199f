"""`transfer bench --scaling`: the replicated photos, what the decoded-image cache does when a split stops fitting
its budget (it says so in one line and streams), and the quick workload end to end through the command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from transfer_cli.benchmarks.scaling import format_scaling, image_cache_state, replicate
from transfer_cli.data.image_cache import DecodedImages, maybe_cache

from helpers import one_error_line, transfer, write_split_folders


class Pictures(Dataset):
    """Six 40x30 images, as an image folder serves them (PIL image, label)."""

    def __init__(self) -> None:
        self.items = [(Image.new("RGB", (40, 30), (index * 40, 0, 0)), index % 2) for index in range(6)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.items[index]


def test_replicas_are_the_same_bytes_under_new_names(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_split_folders(photos, per_class=3)
    count = replicate(photos, 4, tmp_path / "x4")
    assert count == 4 * 2 * 2 * 3  # 4 copies of train/ and val/, two classes of three
    for split in ("train", "val"):
        for source in (photos / split).rglob("*.png"):
            copies = sorted((tmp_path / "x4" / split / source.parent.name).glob(f"x*-{source.name}"))
            assert len(copies) == 4 and all(copy.read_bytes() == source.read_bytes() for copy in copies)
    assert not (tmp_path / "x4" / "test").exists()  # only what a run reads


def test_a_split_over_the_budget_streams_and_says_so_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """dataset.cache_images=auto: over dataset.cache_budget_mb, nothing is decoded into memory (the dataset comes
    back as it was, read every epoch) and one log line says so, which the scaling table reads."""
    resize = v2.Resize(36, antialias=True)
    with caplog.at_level(logging.INFO, logger="transfer_cli.data.image_cache"):
        streamed = maybe_cache(Pictures(), "auto", 0.01, resize, 36, "train", workers=1)
    assert isinstance(streamed, Pictures)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "exceeds dataset.cache_budget_mb=0.01, decoding every epoch" in lines[0]
    assert image_cache_state(lines[0]).startswith("streamed")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transfer_cli.data.image_cache"):
        kept = maybe_cache(Pictures(), "auto", 1.0, resize, 36, "train", workers=1)
    assert isinstance(kept, DecodedImages) and len(kept) == 6
    assert image_cache_state(caplog.records[-1].getMessage()) == "kept (0 MB)"


def test_scaling_needs_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRANSFER_BENCH_PHOTOS", raising=False)
    done = transfer("bench", "--scaling", "--quick", "--out", str(tmp_path / "out"))
    one_error_line(done.returncode, done.stderr, "--photos", "TRANSFER_BENCH_PHOTOS", out=done.stdout)
    assert not (tmp_path / "out" / "bench_scaling.json").exists()


@pytest.mark.slow
def test_quick_scaling_times_every_run_and_streams_where_the_budget_ends(tmp_path: Path) -> None:
    """Six `transfer train` processes (two scales x cold, warm, fine-tune): the budget holds 1x's train split, not
    2x's; the warm run reads the cold run's features."""
    photos = tmp_path / "photos"
    write_split_folders(photos)
    done = transfer("bench", "--scaling", "--quick", "--photos", str(photos), "--out", str(tmp_path / "out"),
                    timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench_scaling.json").read_text())
    rows = {(row["scale"], row["run"]): row for row in report["scaling"]["rows"]}
    assert sorted(rows) == [(scale, run) for scale in (1, 2)
                            for run in ("feature_extract_cold", "feature_extract_warm", "fine_tune")]
    for scale in (1, 2):
        assert rows[scale, "feature_extract_cold"]["images"] == scale * 32  # train/ and val/, 16 each
        assert not rows[scale, "feature_extract_cold"]["feature_cache_hit"]
        assert rows[scale, "feature_extract_warm"]["feature_cache_hit"]
        for run in ("feature_extract_cold", "feature_extract_warm", "fine_tune"):
            row = rows[scale, run]
            assert 0 < row["epoch_seconds"] < row["seconds"] and row["peak_rss_mb"] > 0
            assert row["image_cache"].startswith("kept" if scale == 1 else "streamed"), row
    assert report["machine"]["cpu_count"] >= 1 and report["timestamp"]
    table = format_scaling(report["scaling"])
    assert table in done.stdout and "streamed (~0 MB > budget 0.1 MB)" in table
