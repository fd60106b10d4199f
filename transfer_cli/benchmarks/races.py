"""The races against other tools in `transfer bench`: timm's train.py (peers.py) and the scikit-learn probe
(probe.py). Each figure is a dict whose `ratio` (our wall time over theirs) is checked against its target, and
counts only where `accuracy_met` holds; or `skipped: <why>`, which no target check fails on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transfer_cli.benchmarks.inputs import BenchInputs
from transfer_cli.benchmarks.peers import FineTuneJob, race_timm
from transfer_cli.benchmarks.probe import ProbeJob, race_probe


ACCURACY_TOLERANCE = 0.02  # a race is won only at the same accuracy


def race_figures(race: FineTuneJob, probe: ProbeJob, inputs: BenchInputs, tmp: Path,
                 env: dict[str, str]) -> dict[str, Any]:
    """peer_timm_fine_tune and feature_cache_vs_probe, each a dict of figures or `skipped: <why>`."""
    peer = race_timm(race, inputs, tmp / "peer", env)
    if isinstance(peer, dict):  # the same accuracy, either way
        peer.update(accuracy_met=abs(peer["accuracy_diff"]) <= ACCURACY_TOLERANCE,
                    accuracy_rule=f"|transfer - timm| <= {ACCURACY_TOLERANCE:g}")
    versus_probe = race_probe(probe, inputs, tmp / "probe", env)
    if isinstance(versus_probe, dict):  # ours trained to the probe's accuracy, or better
        versus_probe.update(accuracy_met=versus_probe["accuracy_diff"] >= -ACCURACY_TOLERANCE,
                            accuracy_rule=f"transfer >= probe - {ACCURACY_TOLERANCE:g}")
    return {"peer_timm_fine_tune": peer, "feature_cache_vs_probe": versus_probe}


def race_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) lines of the printed table for both races."""
    rows = []
    peer, versus_probe = report.get("peer_timm_fine_tune"), report.get("feature_cache_vs_probe")
    if isinstance(peer, str):
        rows.append(("peer_timm_fine_tune", peer))
    elif peer:
        ours, timm = peer["transfer"], peer["timm"]
        rows += [("peer_timm_fine_tune", f"{peer['ratio']:.3f} (wall time, transfer / timm)"),
                 ("  wall s transfer / timm", f"{ours['seconds']:.1f} / {timm['seconds']:.1f}"),
                 ("  train images/s transfer / timm", f"{ours['train_images_per_s']:.1f} / "
                                                      f"{timm['train_images_per_s']:.1f}"),
                 ("  val top-1 transfer / timm", f"{ours['val_acc1']:.3f} / {timm['val_acc1']:.3f}"),
                 ("  train s transfer / timm", f"{sum(ours['train_seconds']):.1f} / {sum(timm['train_seconds']):.1f}"),
                 ("  val s transfer / timm", f"{sum(ours['val_seconds']):.1f} / {sum(timm['val_seconds']):.1f}"),
                 ("  peak RSS MB transfer / timm", f"{ours['peak_rss_mb']:.0f} / {timm['peak_rss_mb']:.0f}")]
    if isinstance(versus_probe, str):
        rows.append(("feature_cache_vs_probe", versus_probe))
    elif versus_probe:
        cold, warm, probe = versus_probe["transfer_cold"], versus_probe["transfer_warm"], versus_probe["probe"]
        rows += [("feature_cache_vs_probe", f"{versus_probe['ratio']:.3f} (wall time, transfer warm / probe)"),
                 ("  wall s warm / cold / probe", f"{warm['seconds']:.1f} / {cold['seconds']:.1f} / "
                                                  f"{probe['seconds']:.1f}"),
                 ("  cold / probe", f"{versus_probe['cold_ratio']:.3f}"),
                 ("  val top-1 warm / cold / probe", f"{warm['val_acc1']:.3f} / {cold['val_acc1']:.3f} / "
                                                     f"{probe['val_acc1']:.3f}")]
    return rows


def race_check(figure: dict[str, Any] | str, op: str, threshold: float) -> dict[str, Any]:
    """A race's target check: None (skipped), or whether its ratio meets `op threshold` at the same accuracy."""
    target = f"{op} {threshold:g}"
    if isinstance(figure, str):
        return {"value": None, "target": target, "met": None, "skipped": figure}
    fast = figure["ratio"] <= threshold if op == "<=" else figure["ratio"] < threshold
    return {"value": figure["ratio"], "target": f"{target}, {figure['accuracy_rule']}",
            "met": fast and figure["accuracy_met"], "accuracy_diff": figure["accuracy_diff"]}
