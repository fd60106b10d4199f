"""A run directory belongs to one run: refused re-use, one writer at a time, unique default names,
and the CLI's error boundary (a bug is one line and a traceback file; no half-made run dir).

In-process where the point is the command's answer; subprocesses where a second process is the point.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from transfer_cli.cli import main
from transfer_cli.config.compose import compose, quoted, sweep_dir
from transfer_cli.core.errors import TransferError
from transfer_cli.parallel import distributed
from transfer_cli.runs import runlock
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training import run as train_module

from conftest import REPO
from helpers import hydra_state_restored


QUICK = ["experiment=smoke", "strategy=feature_extract", "dataset.train_size=64", "dataset.val_size=32",
         "trainer.epochs=3"]

pytestmark = pytest.mark.usefixtures("hydra_in_process")


def tree(root: Path) -> dict[str, Any]:
    """Every entry under `root`, with each file's mtime and content hash: any write shows."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def train_cli(run_dir: Path, *overrides: str) -> int:
    return main(["train", *QUICK, *overrides, f"hydra.run.dir={run_dir}"])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def crash_in_epoch(epoch: int, error: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the training loop raise `error` when it starts epoch `epoch` (1-based): every run's fit gets a
    callback that raises it."""
    class Crash(trainer.Callback):
        def on_epoch_start(self, stage: Any, started: int) -> None:
            if started == epoch:
                raise error

    real_fit = train_module.fit

    def fit_that_crashes(*args: Any, callbacks: Any = (), **kwargs: Any) -> Any:
        return real_fit(*args, callbacks=[*callbacks, Crash()], **kwargs)

    monkeypatch.setattr(train_module, "fit", fit_that_crashes)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run, trained in this process; Hydra's log handlers go after it (as in hydra_in_process)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    with hydra_state_restored():
        assert train_cli(run_dir) == 0
    return run_dir


# --------------------------------------------------------------------------- a directory that holds a run


@pytest.mark.parametrize("overrides", [[], ["trainer.seed=7"], ["trainer.batch_size=0"], ["dry_run=true"]])
def test_training_into_a_finished_run_changes_no_byte(
        finished: Path, capsys: pytest.CaptureFixture[str], overrides: list[str]) -> None:
    before = tree(finished)
    assert {".hydra/config.yaml", "train.log", "summary.json", "metrics.jsonl"} <= set(before)
    capsys.readouterr()
    assert train_cli(finished, *overrides) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("transfer: error: ")
    if overrides != ["trainer.batch_size=0"]:  # that one is refused for its value, even earlier
        assert f"{finished} already holds a finished run: give a new hydra.run.dir" in line
    assert tree(finished) == before
    assert main(["resume", str(finished)]) == 0 and tree(finished) == before  # finished: not even locked


@pytest.mark.slow
def test_a_bug_after_a_checkpoint_keeps_the_run_resumable_and_a_new_run_may_not_take_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        crash_in_epoch(2, RuntimeError("simulated bug in epoch 2"), patch)
        assert train_cli(run_dir) == 1
    line = one_line(capsys.readouterr().err)
    assert "RuntimeError: simulated bug in epoch 2" in line
    assert f"full traceback in {run_dir / 'error.log'}; continue with: transfer resume {run_dir}" in line
    log = (run_dir / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "simulated bug in epoch 2" in log
    assert (run_dir / "checkpoints" / "last.pt").is_file() and [r["epoch"] for r in read_metrics(run_dir)] == [1]

    before = tree(run_dir)
    assert train_cli(run_dir) == 2
    assert one_line(capsys.readouterr().err) == (
        f"transfer: error: {run_dir} holds an interrupted run: continue it with `transfer resume {run_dir}`, "
        "or give a new hydra.run.dir")
    assert tree(run_dir) == before

    assert main(["resume", str(run_dir)]) == 0
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]


# --------------------------------------------------------------------------- the error boundary


@pytest.mark.slow
def test_a_bug_before_the_first_checkpoint_leaves_no_run_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken_plan(*args: Any) -> Any:
        raise RuntimeError("simulated bug in build_plan")

    monkeypatch.setattr(train_module, "build_plan", broken_plan)
    run_dir = tmp_path / "run"
    assert train_cli(run_dir) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("transfer: internal error (RuntimeError: simulated bug in build_plan); full traceback in ")
    log = Path(line.split("full traceback in ", 1)[1])
    assert "Traceback (most recent call last)" in log.read_text() and "broken_plan" in log.read_text()
    assert not run_dir.exists()

    mine = tmp_path / "mine"  # a directory of the user's: only what the run wrote goes
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert train_cli(mine) == 1
    one_line(capsys.readouterr().err)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("epoch", "message"), [(1, "interrupted before the first checkpoint: nothing kept"),
                                                (2, "interrupted; continue with: transfer resume")])
def test_a_second_ctrl_c_is_one_line_and_exit_130(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], epoch: int,
        message: str) -> None:
    crash_in_epoch(epoch, KeyboardInterrupt(), monkeypatch)
    run_dir = tmp_path / "run"
    assert train_cli(run_dir) == 130
    assert message in one_line(capsys.readouterr().err)
    assert run_dir.exists() == (epoch == 2)


def test_a_bug_in_any_command_is_one_line_with_its_traceback_in_a_file(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from transfer_cli.commands import report

    def broken(argv: list[str]) -> int:
        raise KeyError("simulated")

    monkeypatch.setattr(report, "main", broken)
    assert main(["report", "somewhere"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "(KeyError: 'simulated')" in line
    assert "in broken" in Path(line.split("full traceback in ", 1)[1]).read_text()


# --------------------------------------------------------------------------- one writer


def test_a_locked_run_dir_refuses_a_second_writer_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    with runlock.acquire(run_dir, "transfer train"):  # flock conflicts between two opens in one process too
        before = tree(run_dir)
        assert train_cli(run_dir) == 2
        line = one_line(capsys.readouterr().err)
        assert f"{run_dir} is being written by `transfer train` (pid {os.getpid()} on " in line
        assert tree(run_dir) == before
        (run_dir / "config.yaml").write_text("trainer: {}\n")  # the writer got further: still refused, still itself
        assert train_cli(run_dir) == 2 and "is being written by `transfer train`" in capsys.readouterr().err
        assert main(["resume", str(run_dir)]) == 2
        assert f"{run_dir} is being written by `transfer train`" in one_line(capsys.readouterr().err)
    assert runlock.holder(run_dir) is None


@pytest.mark.slow
def test_a_sweep_job_locks_its_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    with runlock.acquire(sweep / "0", "transfer resume"):
        assert main(["train", "-m", *QUICK, f"hydra.sweep.dir={sweep}"]) == 2
        assert f"{sweep / '0'} is being written by `transfer resume`" in one_line(capsys.readouterr().err)
        assert (sweep / "0" / ".lock").is_file()  # another process's run dir: never discarded


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "transfer_cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition: Any, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_processes_on_one_dir_one_refuses_and_a_killed_writer_leaves_no_stale_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = spawn("train", *QUICK, "trainer.epochs=300", f"hydra.run.dir={run_dir}")
    wait_for(lambda: len(read_metrics(run_dir)) >= 1, first, "a first epoch")
    second = subprocess.run([sys.executable, "-m", "transfer_cli", "train", *QUICK, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert f"{run_dir} is being written by `transfer train` (pid {first.pid} " in one_line(second.stderr)
    assert first.poll() is None
    first.send_signal(signal.SIGKILL)  # the kernel drops the lock with its holder
    first.communicate(timeout=60)

    resumed = spawn("resume", str(run_dir))
    wait_for(lambda: "transfer resume" in (runlock.holder(run_dir) or ""), resumed, "the resume's lock")
    again = subprocess.run([sys.executable, "-m", "transfer_cli", "resume", str(run_dir)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert f"{run_dir} is being written by `transfer resume` (pid {resumed.pid} " in one_line(again.stderr)
    logged = len(read_metrics(run_dir))
    wait_for(lambda: len(read_metrics(run_dir)) > logged, resumed, "a resumed epoch")  # in the loop, not starting up
    resumed.send_signal(signal.SIGINT)  # the first Ctrl-C: a checkpoint after this step, exit 130
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, err[-2000:]
    epochs = [r["epoch"] for r in read_metrics(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer at a time: no epoch twice


# --------------------------------------------------------------------------- unique default names


def test_clock_made_names_are_unique_even_in_one_second(tmp_path: Path) -> None:
    same_second = tmp_path / "runs" / "2025-01-01_12-00-00"
    locks = [runlock.claim_new(same_second, True, "transfer train") for _ in range(40)]
    dirs = [lock.run_dir for lock in locks]
    assert len(set(dirs)) == 40 and dirs[0] == same_second and dirs[1].name == "2025-01-01_12-00-00_2"
    assert all((d / ".lock").is_file() for d in dirs)
    for lock in locks:
        lock.release()
    assert runlock.claim_new(same_second, True, "t").run_dir.name == "2025-01-01_12-00-00_41"
    assert runlock.unused_dir(same_second).name == "2025-01-01_12-00-00_42"


def test_the_default_run_dir_comes_from_the_clock_and_a_chosen_one_does_not(tmp_path: Path) -> None:
    composed = compose(QUICK)
    assert composed.from_clock and not composed.multirun and composed.run_dir.parent == Path("outputs/runs").absolute()
    chosen = compose([*QUICK, f"hydra.run.dir={tmp_path}"])
    assert (chosen.run_dir, chosen.from_clock) == (tmp_path, False)
    planned, from_clock = sweep_dir([*QUICK, "trainer.seed=1,2"])
    assert from_clock and planned.parent == Path("outputs/multirun")


def test_ranks_after_the_first_wait_for_rank_0s_dir_and_create_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    received = []

    def rank_0_refused(value: Any) -> Any:  # what rank 0 sends when its claim fails
        received.append(value)
        return TransferError("rank 0 could not claim the run dir")

    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", rank_0_refused)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *QUICK]) == 2
    assert received == [None] and list(tmp_path.iterdir()) == []  # a rank > 0 claims nothing itself
    assert "rank 0 could not claim the run dir" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["/tmp/a b/c", "/tmp/it's", "/tmp/x\\", "/tmp/a,b=c[d]{e}", "/tmp/q\\'x", "C:\\r\\n",
                                  "a\\\\'\\"])
def test_a_claimed_dir_reaches_hydra_unchanged(path: str) -> None:
    override = OverridesParser.create().parse_override(f"hydra.run.dir={quoted(path)}")
    assert override.value() == path


@pytest.mark.slow
def test_two_runs_started_together_get_two_dirs(tmp_path: Path) -> None:
    pattern = f"hydra.run.dir={tmp_path}/runs/" + "${now:%Y}"  # one name for both, unless the year turns
    processes = [spawn("train", *QUICK, pattern) for _ in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and runs[1].name == f"{runs[0].name}_2"
    for run_dir in runs:
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
        assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]
