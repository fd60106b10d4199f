"""feature_cache_vs_probe: a head-only job against the plain alternative a user would write.

The probe (PROBE, a script of its own that uses only timm, torch and scikit-learn): the backbone's pooled
features (timm forward_features + forward_head(pre_logits=True)) of the train and val images through the
weights' eval transform, computed once, and scikit-learn's LogisticRegression fitted on them. Ours:
`transfer train strategy=feature_extract` with the feature cache, cold (an empty cache: it computes the same
features) and warm (a second run over the same cache). Each is one process, timed from start to exit.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transfer_cli.benchmarks.inputs import BenchInputs, warm_file_cache
from transfer_cli.benchmarks.process import Timed, timed_command


NO_SKLEARN = 'skipped: scikit-learn not installed (pip install -e ".[bench]")'

# `python -c PROBE DATA MODEL PRETRAINED IMAGE_SIZE WORKERS OUT`: what a user writes to probe a backbone
PROBE = """
import json, sys
import timm, torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

data, name, pretrained, size, workers, out = sys.argv[1:]
model = timm.create_model(name, pretrained=pretrained == "1", num_classes=0).eval()
config = timm.data.resolve_data_config({"input_size": (3, int(size), int(size))}, model=model)
transform = timm.data.create_transform(**config)

def features(split):
    loader = DataLoader(ImageFolder(f"{data}/{split}", transform), batch_size=64, num_workers=int(workers))
    pooled, labels = [], []
    with torch.inference_mode():
        for images, targets in loader:
            pooled.append(model.forward_head(model.forward_features(images), pre_logits=True))
            labels.append(targets)
    return torch.cat(pooled).numpy(), torch.cat(labels).numpy()

train_x, train_y = features("train")
val_x, val_y = features("val")
probe = LogisticRegression(max_iter=1000).fit(train_x, train_y)
with open(out, "w") as file:
    json.dump({"val_acc1": float(probe.score(val_x, val_y)), "train_images": len(train_y),
               "val_images": len(val_y), "features": int(train_x.shape[1])}, file)
"""


@dataclass(frozen=True)
class ProbeJob:
    model: str
    pretrained: bool
    image_size: int
    workers: int
    epochs: int  # our head's epochs: enough to reach the probe's accuracy


LITE0_PROBE = ProbeJob("tf_efficientnet_lite0.in1k", pretrained=True, image_size=224, workers=2, epochs=20)
QUICK_PROBE = ProbeJob("test_resnet", pretrained=False, image_size=32, workers=0, epochs=2)


def feature_extract_overrides(job: ProbeJob, photos: str, cache_dir: Path) -> list[str]:
    """`transfer train strategy=feature_extract` on the photos, its feature cache in `cache_dir`."""
    return ["backbone=timm", f"backbone.name={job.model}", f"backbone.pretrained={str(job.pretrained).lower()}",
            "dataset=folder", f"dataset.root={photos}", "strategy=feature_extract", "augment=none",
            f"transforms.image_size={job.image_size}", f"trainer.epochs={job.epochs}",
            f"trainer.num_workers={job.workers}", "trainer.device=cpu", f"trainer.cache_dir={cache_dir}"]


def _checked(side: str, timed: Timed, log: Path) -> Timed:
    if timed.returncode != 0:
        raise RuntimeError(f"probe race: {side} failed (exit {timed.returncode}):\n{timed.tail(log)}")
    return timed


def race_probe(job: ProbeJob, inputs: BenchInputs, tmp: Path, env: dict[str, str]) -> dict[str, Any] | str:
    """The probe, then ours cold and warm; or `skipped: <why>`."""
    if importlib.util.find_spec("sklearn") is None:
        return NO_SKLEARN
    reason = inputs.missing_photos() or (inputs.missing_weights(job.model) if job.pretrained else None)
    if reason:
        return f"skipped: {reason}"
    env = inputs.env(env)
    photos = str(Path(inputs.photos).resolve())
    warm_file_cache(Path(photos))
    result = tmp / "probe.json"
    command = [sys.executable, "-c", PROBE, photos, job.model, "1" if job.pretrained else "0", str(job.image_size),
               str(job.workers), str(result)]
    probe = _checked("the probe", timed_command(command, tmp / "probe.log", env=env), tmp / "probe.log")
    probe_figures = json.loads(result.read_text())
    overrides = feature_extract_overrides(job, photos, tmp / "feature-cache")
    ours = {}
    for temperature in ("cold", "warm"):
        run_dir = tmp / f"probe-race-{temperature}"
        log = tmp / f"probe-race-{temperature}.log"
        timed = _checked(f"transfer train ({temperature} cache)", timed_command(
            [sys.executable, "-m", "transfer_cli", "train", *overrides, f"hydra.run.dir={run_dir}"], log, env=env), log)
        summary = json.loads((run_dir / "summary.json").read_text())
        ours[temperature] = {"seconds": timed.seconds, "peak_rss_mb": timed.peak_rss_mb,
                             "val_acc1": summary["final_val_acc"], "cache_hit": "feature cache hit" in log.read_text()}
    return {"job": asdict(job), "probe": {"seconds": probe.seconds, "peak_rss_mb": probe.peak_rss_mb,
                                          **probe_figures},
            "transfer_cold": ours["cold"], "transfer_warm": ours["warm"], "overrides": overrides,
            "ratio": ours["warm"]["seconds"] / probe.seconds, "cold_ratio": ours["cold"]["seconds"] / probe.seconds,
            "accuracy_diff": ours["warm"]["val_acc1"] - probe_figures["val_acc1"]}
