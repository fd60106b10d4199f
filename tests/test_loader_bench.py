"""`transfer bench`'s loader figures (benchmarks/loader.py): what they time and how they are reported.

No timing target is asserted here (the machine is shared and noisy): `make bench` checks them. What the
loader child measures in a real `transfer bench --quick` is checked in test_bench.py, on its bench.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from transfer_cli.benchmarks import cpu as bench
from transfer_cli.benchmarks.loader import loader_report, table_rows, write_photos


def test_the_bench_photos_are_full_size_jpegs_and_repeat(tmp_path: Path) -> None:
    write_photos(tmp_path / "a", 3)
    write_photos(tmp_path / "b", 3)
    files = sorted((tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 3 and {f.parent.name for f in files} == {"class_0", "class_1"}
    for path in files:
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (2000, 1500), "RGB")
        assert 300_000 < path.stat().st_size < 2_000_000  # a camera's 3 MP JPEG, not noise (~3 MB) or flat (~50 kB)
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(twin.read_bytes()).digest()


def _figures(draft: float, full: float, model: float | None = None) -> dict:
    return {"draft_images_per_s": draft, "full_images_per_s": full, "model_train_images_per_s": model}


def test_the_report_divides_the_figures_and_names_the_bound() -> None:
    result = {"workloads": {"loop": _figures(90.0, 30.0, 300.0), "feature_cache": _figures(100.0, 40.0, 50.0)},
              "resize_224": _figures(30.0, 20.0)}
    report = loader_report(result)
    assert report["loader_images_per_s"] == {"loop": 90.0, "feature_cache": 100.0}
    assert report["model_train_images_per_s"] == {"loop": 300.0, "feature_cache": 50.0}
    assert report["draft_decode_speedup"] == pytest.approx(2.5)  # the workloads' smaller ratio; 224 px beside it
    assert report["loader"]["draft_decode_speedups"]["resize_224"] == pytest.approx(1.5)
    rows = dict(table_rows(report))
    assert rows["  loop model train img/s"].endswith("(bound: loader)")
    assert rows["  feature_cache model train img/s"].endswith("(bound: model)")
    assert "1.50x" in rows["  224px eval loader img/s"] and rows["draft_decode_speedup"] == "2.50"
    assert bench.TARGETS["draft_decode_speedup"] == (">=", 2.0)
