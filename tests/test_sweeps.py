"""Sweeps: re-running a sweep skips finished jobs and resumes partial ones; launchers and Optuna search.

Re-run semantics are tested in-process with Hydra's basic launcher; the submitit_local
launcher, the joblib launcher and the Optuna sweeper are optional extras
(`pip install -e ".[cluster,search]"`): their tests skip, saying so, when the plugin is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir

from transfer_cli.commands.train import main as run_train
from transfer_cli.config.loading import config_dir
from transfer_cli.core.extras import installed
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training.run import train

from conftest import FAST, REPO, compose_train
from helpers import comparable


QUICK = FAST + ["strategy=feature_extract", "dataset.train_size=64",
                "dataset.val_size=32"]  # head-only: cached features
SWEEP = QUICK + ["trainer.seed=1,2"]


def plugin(name: str, extra: str) -> None:
    if not installed(f"hydra_plugins.{name}"):
        pytest.skip(f"{name} is not installed: pip install -e \".[{extra}]\" to test it")


pytestmark = pytest.mark.usefixtures("hydra_in_process")


def sweep(sweep_dir: Path, *overrides: str) -> int:
    try:
        return run_train(["-m", *overrides, f"hydra.sweep.dir={sweep_dir}"])
    except SystemExit as stop:  # Hydra exits 1 when a job raised
        return int(stop.code or 0)


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Files a finished run owns (Hydra itself rewrites .hydra/ and appends to train.log on a re-run)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}




@pytest.mark.slow
def test_a_rerun_sweep_skips_finished_jobs_and_resumes_the_crashed_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = tmp_path / "sweep"
    real_fit = trainer.fit

    class CrashInEpoch2(trainer.Callback):
        def on_epoch_start(self, stage: Any, epoch: int) -> None:
            if epoch == 2:
                raise RuntimeError("simulated crash of job 1 in epoch 2")

    def crash_in_job_1_epoch_2(setup: Any, *args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        crash = [CrashInEpoch2()] if setup.run_dir.name == "1" else []
        return real_fit(setup, *args, callbacks=[*callbacks, *crash], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("transfer_cli.training.run.fit", crash_in_job_1_epoch_2)
        assert sweep(sweep_dir, *SWEEP) != 0
    job0, job1 = sweep_dir / "0", sweep_dir / "1"
    assert json.loads((job0 / "summary.json").read_text())["status"] == "finished"
    assert not (job1 / "summary.json").exists() and (job1 / "checkpoints" / "last.pt").is_file()
    finished, first_epoch = snapshot(job0), read_metrics(job1)
    assert [r["epoch"] for r in first_epoch] == [1]
    capsys.readouterr()

    assert sweep(sweep_dir, *SWEEP) == 0
    out = capsys.readouterr().out
    assert f"run dir: {job0} (finished before: skipped)" in out
    assert snapshot(job0) == finished  # not retrained, not rewritten
    assert "resuming" in (job1 / "train.log").read_text()
    records = read_metrics(job1)
    assert records[0] == first_epoch[0] and [r["epoch"] for r in records] == [1, 2, 3]
    # resumed from checkpoints/last.pt exactly as `transfer resume` does: the uninterrupted run's metrics
    train(compose_train(QUICK + ["trainer.seed=2"]), tmp_path / "uninterrupted")
    assert comparable(records) == comparable(read_metrics(tmp_path / "uninterrupted"))

    # the same sweep dir with other overrides is refused, never overwritten
    assert sweep(sweep_dir, *QUICK, "trainer.seed=3") == 2
    assert "holds a run with another config (trainer.seed: 1 there, 3 now)" in capsys.readouterr().err
    assert snapshot(job0) == finished


def test_joblib_launcher_composes() -> None:
    plugin("hydra_joblib_launcher", "cluster")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_optuna_search_composes() -> None:
    plugin("hydra_optuna_sweeper", "search")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "experiment=smoke"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optimizer.lr_scale", "strategy"}
    assert "interval" in sweeper.params["optimizer.lr_scale"] and "gradual" in sweeper.params["strategy"]
    assert compose_train(["hparams_search=optuna"]).dataset.name == "flowers102"  # the job config is untouched


@pytest.mark.slow
def test_optuna_search_maximizes_the_selected_acc_and_replays_on_rerun(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin("hydra_optuna_sweeper", "search")
    overrides = ["hparams_search=optuna", *FAST, "dataset.train_size=64", "dataset.val_size=32",
                 "hydra.sweeper.n_trials=3"]
    assert sweep(tmp_path, *overrides) == 0
    # the search tunes on the selection split, never on the val split it reports
    accuracies = [json.loads(p.read_text())["selected_acc"] for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(accuracies) == 3
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(accuracies))
    assert set(result["best_params"]) == {"optimizer.lr_scale", "strategy"}

    capsys.readouterr()
    assert sweep(tmp_path, *overrides) == 0  # the seeded sampler proposes the same trials: all skipped
    assert capsys.readouterr().out.count("(finished before: skipped)") == 3
    assert yaml.safe_load((tmp_path / "optimization_results.yaml").read_text()) == result


@pytest.mark.slow
def test_submitit_local_runs_a_sweep_and_a_rerun_skips_it(tmp_path: Path) -> None:
    plugin("hydra_submitit_launcher", "cluster")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "TRANSFER_CACHE": str(tmp_path / "feature-cache")}
    command = [sys.executable, "-m", "transfer_cli", "train", "-m", "hydra/launcher=submitit_local",
               "hydra.launcher.timeout_min=10", *SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2 and all(json.loads(p.read_text())["status"] == "finished" for p in summaries)
    written = [p.stat().st_mtime_ns for p in summaries]

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in summaries] == written
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.out"))
    assert logs.count("(finished before: skipped)") == 2


@pytest.mark.slow
def test_submitit_tasks_per_node_run_one_job_data_parallel(tmp_path: Path) -> None:
    """hydra.launcher.tasks_per_node=2: one sweep job trained by 2 processes (as on a SLURM node with 2 GPUs)."""
    plugin("hydra_submitit_launcher", "cluster")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "TRANSFER_CACHE": str(tmp_path / "feature-cache"),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "transfer_cli", "train", "-m", "hydra/launcher=submitit_local",
               "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", *FAST, "trainer.device=cpu",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2
    assert (tmp_path / "sweep" / "0" / "train.log").read_text().count("] - epoch 3 [") == 1


@pytest.mark.slow
def test_a_rerun_sweep_skips_its_finished_jobs_without_loading_torch(tmp_path: Path) -> None:
    """A launcher's job process that finds its run finished exits without paying for torch."""
    sweep_dir = tmp_path / "sweep"
    assert sweep(sweep_dir, *SWEEP) == 0
    args = ["train", "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    code = f"import sys; from transfer_cli.cli import main; code = main({args!r}); print('torch' in sys.modules); " \
           "sys.exit(code)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("(finished before: skipped)") == 2
    assert result.stdout.strip().endswith("False")
