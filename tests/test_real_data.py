"""Real photos and real ImageNet weights from ../shared/assets (skipped where unset).

Runs the installed command in a subprocess: huggingface_hub reads HF_HOME and
HF_HUB_OFFLINE when first imported, so they must be set before the process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_feature_extraction_on_hymenoptera_reaches_90_percent(assets: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(assets / "hf-home"), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "transfer_cli", "train",
        "backbone=timm", "backbone.name=tf_efficientnet_lite0.in1k",
        "dataset=folder", f"dataset.root={assets / 'data' / 'hymenoptera'}",
        "strategy=feature_extract", "trainer.epochs=3", "trainer.num_workers=2", f"hydra.run.dir={tmp_path}",
        "augment=none",  # deterministic inputs: the feature cache applies, one backbone pass instead of three
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weights"].startswith("hf-hub"), "pretrained weights must come from the offline cache"
    assert summary["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert summary["preprocessing"]["interpolation"] == "bicubic"
    assert summary["best_val_acc"] >= 0.90
