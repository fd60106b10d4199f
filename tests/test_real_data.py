"""Real photos and real ImageNet weights from ../shared/assets (skipped where unset)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_train
from transfer_cli.train import train


@pytest.mark.slow
def test_feature_extraction_on_hymenoptera_reaches_90_percent(assets: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(assets / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_train([
        "backbone=tf_efficientnet_lite0",
        "dataset=folder", f"dataset.root={assets / 'data' / 'hymenoptera'}",
        "strategy=feature_extract", "trainer.epochs=3", "trainer.num_workers=2",
    ])
    summary = train(cfg, tmp_path)
    assert summary["weights"].startswith("hf-hub"), "pretrained weights must come from the offline cache"
    assert summary["preprocessing"]["mean"] == (0.5, 0.5, 0.5) and summary["preprocessing"]["interpolation"] == "bicubic"
    assert summary["best_val_acc"] >= 0.90
