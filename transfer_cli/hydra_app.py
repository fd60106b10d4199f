"""The Hydra boundary: compose the config, convert it once to dataclasses, run, report.

Below this module nothing imports Hydra. User mistakes (TransferError) become one line
on stderr and exit code 2; a run that failed before training leaves no run directory.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HYDRA_ONLY_FILES = {".hydra", "train.log", "config.yaml"}


def config_dir() -> Path:
    """`conf/` inside an installed package, else at the repository root."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if installed.is_dir() else here.parent / "conf"


def _discard_unstarted(run_dir: Path) -> None:
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_ONLY_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_train(argv: list[str]) -> int:
    """Run `transfer train` with Hydra's own argument handling (overrides, -m, --help, --cfg)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from transfer_cli.config import register_configs
    from transfer_cli.errors import TransferError

    from transfer_cli.trainer import Interrupted

    register_configs()
    failures: list[str] = []
    interrupted: list[str] = []

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def task(composed: DictConfig) -> float | None:
        from transfer_cli.train import train

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            cfg = OmegaConf.to_object(composed)
            OmegaConf.save(composed, run_dir / "config.yaml", resolve=True)
            summary = train(cfg, run_dir)
        except TransferError as error:
            failures.append(str(error))
            _discard_unstarted(run_dir)
            return None
        except Interrupted as stop:
            interrupted.append(f"{stop}; continue with: transfer resume {run_dir}")
            return None
        if summary.get("dry_run"):
            _discard_unstarted(run_dir)
            return None
        print(f"run dir: {run_dir}")
        print(format_result(summary))
        return summary["best_val_acc"]

    sys.argv = ["transfer train", *argv]
    task()
    for failure in failures:
        print(f"transfer: error: {failure}", file=sys.stderr)
    for message in interrupted:
        print(f"transfer: {message}", file=sys.stderr)
    return 130 if interrupted else (2 if failures else 0)


def format_result(summary: dict) -> str:
    """The final figures `transfer train` and `transfer resume` print."""
    text = (f"best val acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), "
            f"final val acc {summary['final_val_acc']:.4f}, {summary['epochs_run']} epochs, "
            f"{summary['wall_time_s']:.1f}s")
    if summary.get("stop_reason") not in (None, "completed all stages"):
        text += f"; stopped: {summary['stop_reason']}"
    return text
