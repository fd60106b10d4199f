"""A sweep given again into its `hydra.sweep.dir`: what each job's directory holds, told before Hydra writes.

Hydra writes a job's `.hydra/` and appends to its train.log before the job starts, so a re-run
is checked first: each job of Hydra's basic sweeper (its directory and config are known up
front, config.compose.sweep_jobs) whose directory exists must hold that job's own run, only
what Hydra wrote for that job number before it was killed, or no entry a run writes, and no
symbolic link there; otherwise the whole sweep is refused with every byte as it was. A sweeper
that picks its jobs as it goes (Optuna) gets that check for every folder of the sweep dir but
the config comparison, which stays per job (`previous_attempt`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transfer_cli.config.compose import sweep_jobs
from transfer_cli.config.loading import check_bounded_yaml, load_run_config
from transfer_cli.config.schema import to_plain
from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import NotOwnFile, link_problem
from transfer_cli.runs import runlock
from transfer_cli.runs.loggers import flatten
from transfer_cli.runs.rundir import read_summary


HYDRA_JOB_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into a job's .hydra/


def check_rerun(overrides: list[str], sweep_dir: Path) -> None:
    """Refuse a sweep into an existing `sweep_dir` before Hydra writes a job's .hydra/ and train.log there, where
    a job's directory holds a run with another config, an entry a run writes but no run, or a link."""
    if not sweep_dir.is_dir():
        return
    _check_multirun_file(sweep_dir / "multirun.yaml")
    jobs = sweep_jobs(overrides)
    if jobs is None:  # the sweeper picks its jobs as it goes: every folder might be one
        found = [(child, None) for child in sorted(sweep_dir.iterdir()) if child.is_dir() and child.name[:1] != "."]
    else:
        found = [(job.run_dir, job) for job in jobs if os.path.lexists(job.run_dir)]
    for run_dir, job in found:
        if run_dir.is_symlink():
            raise NotOwnFile(link_problem(run_dir))
        runlock.refuse_links(run_dir)
        if not (run_dir / "config.yaml").is_file():
            if not (job is not None and _unstarted_job(run_dir, jobs.index(job))):
                runlock.refuse_written_names(run_dir)
        elif job is not None:
            attempt = previous_attempt(run_dir, job.config())
            if attempt["kind"] == "other":
                raise TransferError(another_config(run_dir, attempt["differences"]))


def _unstarted_job(run_dir: Path, num: int) -> bool:
    """Whether `run_dir` holds only what Hydra wrote for job `num` of this sweep before the job was killed (its
    .hydra/ files, train.log, the lock): a re-run trains that job, as it would a missing one."""
    import yaml

    hydra_files = run_dir / ".hydra"
    if {entry.name for entry in run_dir.iterdir()} - {".hydra", "train.log", runlock.LOCK_NAME}:
        return False
    if not hydra_files.is_dir() or {entry.name for entry in hydra_files.iterdir()} - HYDRA_JOB_FILES:
        return False
    try:
        check_bounded_yaml(hydra_files / "hydra.yaml")
        saved = yaml.safe_load((hydra_files / "hydra.yaml").read_text(encoding="utf-8"))
        return saved["hydra"]["job"]["num"] == num and saved["hydra"]["mode"] == "MULTIRUN"
    except (TransferError, OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, KeyError, TypeError):
        return False


def _check_multirun_file(path: Path) -> None:
    """Hydra's sweeper rewrites `multirun.yaml` (the sweep's config): where the file there is not a sweep's own
    (a link, or no YAML mapping with a `hydra` section), it is the user's, and the sweep is refused."""
    if path.is_symlink():
        raise NotOwnFile(link_problem(path))
    if not os.path.lexists(path):
        return
    import yaml

    try:
        check_bounded_yaml(path)
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (TransferError, OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        tree = None
    if not (isinstance(tree, dict) and "hydra" in tree):
        raise TransferError(f"{path} is not a sweep's multirun.yaml, which this sweep would write over: give a new "
                            "hydra.sweep.dir, or move the file aside")


def previous_attempt(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """What a sweep job finds in its directory: nothing yet, a finished run, a partial one, or another run
    (`cfg`: the job's config, stages as they run, as config.yaml records them)."""
    if not (run_dir / "config.yaml").is_file():
        return {"kind": "new"}

    differences = _differences(to_plain(load_run_config(run_dir)), to_plain(cfg))
    if differences:
        return {"kind": "other", "differences": differences}
    summary = run_dir / "summary.json"
    if summary.exists():
        return {"kind": "done", "summary": read_summary(summary)}
    return {"kind": "partial"}


def another_config(run_dir: Path, differences: list[str]) -> str:
    more = " and more" if len(differences) > 1 else ""
    return (f"{run_dir} holds a run with another config ({differences[0]}{more}): "
            "re-run a sweep with its own overrides, or give a new hydra.sweep.dir")


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    old, new = flatten(saved, sep="."), flatten(wanted, sep=".")
    return [f"{key}: {old.get(key)!r} there, {new.get(key)!r} now" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]
