"""The Hydra boundary: compose the config, convert it once to dataclasses, run, report.

Below this module nothing imports Hydra. User mistakes (TransferError) become one line
on stderr and exit code 2; a run that failed before training leaves no run directory.

A sweep (`-m`) can be re-run into the same `hydra.sweep.dir`: a job whose directory holds a
finished run (summary.json) is skipped and reports its stored result, a job that had
started (config.yaml, maybe checkpoints/last.pt) is resumed the way `transfer resume` does
it, and a directory holding a run with another config is an error, never overwritten.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

HYDRA_ONLY_FILES = {".hydra", "train.log", "config.yaml"}


def config_dir() -> Path:
    """`conf/` inside an installed package, else at the repository root."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if installed.is_dir() else here.parent / "conf"


def _discard_unstarted(run_dir: Path) -> None:
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_ONLY_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)


SWEEP_FLAGS = {"-m", "--multirun"}


def composition_error(argv: list[str]) -> str | None:
    """Compose the config up front, so a typo'd key, option or value is one line.

    A sweep is checked value by value (see `_value_by_value`), not job by job. Hydra's own
    flags (--help, --cfg, ...) are left to Hydra, which reports them.
    """
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in SWEEP_FLAGS for flag in flags):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [arg for arg in argv if not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra")]
    try:
        runs = _value_by_value(overrides) if flags else [overrides]
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            for run in runs:
                compose("train", overrides=run)
    except (HydraException, OmegaConfBaseException) as error:
        return _one_line(f"{error}\n{error.__cause__ or ''}")
    return None


def _value_by_value(overrides: list[str]) -> list[list[str]]:
    """Single-run override lists in which every value of every swept key appears once (with the
    first value of the other swept keys): a bad value fails here, before any job starts, at the
    cost of one composition per value rather than per job. Ranges are checked at both ends;
    interval and glob sweeps (a sweeper's search space, a group's own options) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    fixed, swept = [], {}
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
        elif override.is_discrete_sweep() and override.value_type != ValueType.GLOB_CHOICE_SWEEP:
            values = list(override.sweep_string_iterator())
            swept[override.get_key_element()] = values[:1] + values[-1:] if override.is_range_sweep() else values
    first = {key: values[0] for key, values in swept.items() if values}
    runs = [fixed + [f"{key}={value}" for key, value in first.items()]]
    for key, values in swept.items():
        for value in values[1:]:
            runs.append(fixed + [f"{k}={value if k == key else v}" for k, v in first.items()])
    return runs


def compose_config(overrides: list[str]) -> Any:
    """The TrainConfig `transfer train <overrides>` would run, composed in this process without a
    Hydra job (no run dir, no logging set up), for commands that build on it; a composition
    mistake is a one-line TransferError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from transfer_cli.config import register_configs
    from transfer_cli.errors import TransferError

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return OmegaConf.to_object(compose("train", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise TransferError(_one_line(f"{error}\n{error.__cause__ or ''}")) from error


def _one_line(report: str) -> str:
    """Hydra's multi-line report as one line: the message, the options it lists, the key."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    if "Available options" in report:
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        options = [line for line in lines[start:] if not line.startswith(("Config search path", "provider="))]
        options = options[: next((i for i, o in enumerate(options) if ":" in o or "/" in o), len(options))]
        return f"{lines[0]}: choose one of {', '.join(options)}"
    detail = [line for line in lines[1:] if line.startswith(("Key '", "Value '"))]
    return " ".join([lines[0].rstrip("."), "-", *detail[:1]]) if detail else lines[0]


def run_train(argv: list[str]) -> int:
    """Run `transfer train` with Hydra's own argument handling (overrides, -m, --help, --cfg)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    from transfer_cli import distributed
    from transfer_cli.config import register_configs
    from transfer_cli.errors import USER_ERROR_EXIT, Interrupted, TransferError, report_user_error

    missing = _missing_sweeper_plugin(argv)
    if missing:
        return report_user_error(missing)
    register_configs()
    problem = composition_error(argv)
    if problem:
        return report_user_error(problem)
    distributed.init_from_env()  # torchrun: before Hydra composes, so the ranks agree on ${now:} (AgreeOnRunDir)
    failures: list[str] = []
    interrupted: list[str] = []
    launcher_pid = os.getpid()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def task(composed: DictConfig) -> float | None:
        distributed.init_from_env()  # a launcher's job process (submitit, several tasks) joins here
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        main = distributed.is_main()
        try:
            cfg = OmegaConf.to_object(composed)
            resume = None
            if hydra_cfg.mode == RunMode.MULTIRUN:
                found = distributed.broadcast_object(_previous_attempt(run_dir, cfg) if main else None)
                if found["kind"] == "other":
                    raise TransferError(f"{run_dir} holds a run with another config ({found['differences'][0]}"
                                        f"{' and more' if len(found['differences']) > 1 else ''}): "
                                        "re-run a sweep with its own overrides, or give a new hydra.sweep.dir")
                if found["kind"] == "done":
                    return _report_done(run_dir, found["summary"])
                if found["kind"] == "partial":
                    cfg, resume = _resume_point(run_dir)
            if resume is None and main:
                OmegaConf.save(composed, run_dir / "config.yaml", resolve=True)
            from transfer_cli.train import train  # torch: only a job that trains loads it

            summary = train(cfg, run_dir, resume=resume)
        except TransferError as error:
            failures.append(str(error))
            if main:
                _discard_unstarted(run_dir)
            if os.getpid() != launcher_pid:  # a launcher's worker: the job must fail where the launcher sees it
                report_user_error(error)
                raise
            return None
        except Interrupted as stop:
            interrupted.append(f"{stop}; continue with: transfer resume {run_dir}")
            return None
        if summary.get("dry_run"):
            if main:
                _discard_unstarted(run_dir)
            return None
        print(f"run dir: {run_dir}")
        print(format_result(summary))
        return _objective(summary)

    sys.argv = ["transfer train", *argv]
    task()
    for failure in failures:
        report_user_error(failure)
    for message in interrupted:
        print(f"transfer: {message}", file=sys.stderr)
    return 130 if interrupted else (USER_ERROR_EXIT if failures else 0)


def _objective(summary: dict[str, Any]) -> float | None:
    """What a sweeper (Optuna: direction maximize) optimizes: the best validation top-1 accuracy, a float."""
    value = summary.get("best_val_acc")
    return float(value) if value is not None else None


def _previous_attempt(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """What a sweep job finds in its directory: nothing yet, a finished run, a partial one, or another run."""
    if not (run_dir / "config.yaml").is_file():
        return {"kind": "new"}
    from transfer_cli.config import to_plain
    from transfer_cli.rundir import load_run_config

    differences = _differences(to_plain(load_run_config(run_dir)), to_plain(cfg))
    if differences:
        return {"kind": "other", "differences": differences}
    summary = run_dir / "summary.json"
    if summary.is_file():
        return {"kind": "done", "summary": json.loads(summary.read_text(encoding="utf-8"))}
    return {"kind": "partial"}


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    from transfer_cli.loggers import flatten

    old, new = flatten(saved, sep="."), flatten(wanted, sep=".")
    return [f"{key}: {old.get(key)!r} there, {new.get(key)!r} now" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def _report_done(run_dir: Path, summary: dict[str, Any]) -> float | None:
    status = summary.get("status", "finished")
    print(f"run dir: {run_dir} ({status} before: skipped)")
    if status != "finished":
        return None
    print(format_result(summary))
    return _objective(summary)


def _resume_point(run_dir: Path) -> tuple[Any, dict[str, Any] | None]:
    """The saved config and checkpoints/last.pt (None: the run had saved none), as `transfer resume` loads them."""
    from transfer_cli import checkpoint
    from transfer_cli.rundir import load_run_config

    last = run_dir / "checkpoints" / "last.pt"
    state = checkpoint.load(last) if last.is_file() else None
    logging.getLogger(__name__).info(
        "resuming %s from %s", run_dir,
        f"epoch {state['progress']['epoch']} step {state['progress']['step']}" if state else "the start (no checkpoint yet)")
    return load_run_config(run_dir), state


def _missing_sweeper_plugin(argv: list[str]) -> str | None:
    """`hparams_search=...` without the Optuna sweeper plugin: the install hint, before Hydra starts."""
    wanted = [a for a in argv if a.split("=", 1)[0].lstrip("+~") == "hparams_search" and not a.endswith("=null")]
    if wanted and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        return f"{wanted[0]} needs the Optuna sweeper plugin: pip install -e \".[search]\""
    return None


def format_result(summary: dict) -> str:
    """The final figures `transfer train` and `transfer resume` print."""
    text = (f"best val acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), "
            f"final val acc {summary['final_val_acc']:.4f}, {summary['epochs_run']} epochs, "
            f"{summary['wall_time_s']:.1f}s")
    if summary.get("stop_reason") not in (None, "completed all stages"):
        text += f"; stopped: {summary['stop_reason']}"
    return text
