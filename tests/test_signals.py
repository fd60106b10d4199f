"""Torn files and signals: a cut metrics line, orphan temp files, SIGTERM, a non-finite val loss.

Each test breaks a run the way the world does (a full disk mid-append, a kill mid-write, a
preemption's SIGTERM, a model gone NaN) and checks what the user is left with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import transfer_cli.training.run as train_module
from transfer_cli.core.errors import Interrupted, TransferError
from transfer_cli.runs import checkpoint, runlog
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training.run import train

from conftest import REPO, compose_train
from helpers import comparable


RUN = ["experiment=smoke", "dataset.select_fraction=0",
       "strategy=fine_tune", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=2"]
STEPS_PER_EPOCH = 64 // 16  # smoke batch size 16




def strict_json(path: Path) -> Any:
    """Parse as a strict JSON reader would: a bare NaN or Infinity is an error."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{path}: {name} is not JSON")

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]
    return json.loads(text, parse_constant=refuse)


def temp_files(run_dir: Path) -> list[Path]:
    return [path for path in run_dir.rglob("*") if path.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Comparable metrics of RUN trained without a break."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_CACHE", str(run_dir / "feature-cache"))
        train(compose_train(RUN), run_dir)
    return comparable(read_metrics(run_dir))


def after_step(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int, action: Callable[[], None]) -> None:
    """Run `action` right after training step `step` of epoch `epoch`, before that step's checkpoint check."""
    real = trainer.train_one_epoch

    def hooked(*args: Any, on_step: Any, description: str, **kwargs: Any) -> Any:
        def hook(done: int) -> None:
            if description == f"epoch {epoch}" and done == step:
                action()
            on_step(done)

        return real(*args, on_step=hook, description=description, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", hooked)


def sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- SIGTERM, in process


def test_sigterm_mid_epoch_checkpoints_after_the_step_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: list[dict[str, Any]]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        after_step(patch, epoch=2, step=3, action=sigterm_self)
        with pytest.raises(Interrupted, match="terminated by SIGTERM in epoch 2 at step 3") as stop:
            train(compose_train(RUN), tmp_path)
    assert stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone with the run
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 3)
    assert not temp_files(tmp_path) and not (tmp_path / "summary.json").exists()

    train(compose_train(RUN), tmp_path, resume=state)
    assert comparable(read_metrics(tmp_path)) == uninterrupted


def test_sigterm_during_validation_stops_before_the_pass_ends_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: list[dict[str, Any]]) -> None:
    """A long val pass must not outlast a preemption's grace period: the trained epoch is saved, the pass re-run."""
    real_evaluate, passes, batches = trainer.evaluate, [], []

    def evaluate_and_signal(*args: Any, on_batch: Callable[[], None], **kwargs: Any) -> Any:
        passes.append(1)

        def signal_at_first_batch_of_epoch_2() -> None:
            batches.append(len(passes))
            if len(passes) == 2:
                sigterm_self()
            on_batch()

        return real_evaluate(*args, on_batch=signal_at_first_batch_of_epoch_2, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "evaluate", evaluate_and_signal)
        with pytest.raises(Interrupted, match="terminated by SIGTERM in epoch 2 at step 4") as stop:
            train(compose_train(RUN), tmp_path)
    assert stop.value.exit_code == 143 and batches.count(2) == 1  # it stopped after one of the pass's 2 batches
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, STEPS_PER_EPOCH)
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]

    train(compose_train(RUN), tmp_path, resume=state)
    assert comparable(read_metrics(tmp_path)) == uninterrupted


def test_interrupted_keeps_its_exit_code_across_processes() -> None:
    """Launchers (submitit, joblib) pickle a job's exception back to the CLI, which exits with its code."""
    copy = pickle.loads(pickle.dumps(Interrupted("terminated by SIGTERM in epoch 2 at step 3", exit_code=143)))
    assert (str(copy), copy.exit_code) == ("terminated by SIGTERM in epoch 2 at step 3", 143)
    assert Interrupted("interrupted after epoch 1").exit_code == 130


# --------------------------------------------------------------------------- torn files


class DiskFull(OSError):
    pass


def test_a_torn_last_metrics_line_and_orphan_temp_files_do_not_stop_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        uninterrupted: list[dict[str, Any]]) -> None:
    """The disk fills while epoch 2 is appended: half its line reaches metrics.jsonl, no checkpoint follows."""
    real_append = runlog.append_metrics

    def append_until_full(run_dir: Path, record: dict[str, Any]) -> None:
        if record["epoch"] < 2:
            return real_append(run_dir, record)
        line = json.dumps(record)
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(line[: len(line) // 2])
        raise DiskFull(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(runlog, "append_metrics", append_until_full)
        with pytest.raises(DiskFull):
            train(compose_train(RUN), tmp_path)
    # what SIGKILLs mid-write leave: a checkpoint's temp file, a summary's
    (tmp_path / "checkpoints" / ".last.pt.k3j9x2ab.tmp").write_bytes(b"\x80\x02half a pickle")
    (tmp_path / ".summary.json.q8w2e1rt.tmp").write_text('{"status": "fini')
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] == 1

    with caplog.at_level(logging.WARNING, logger="transfer_cli.runs.runlog"):
        train(compose_train(RUN), tmp_path, resume=state)
    warnings = [r.getMessage() for r in caplog.records if r.name == "transfer_cli.runs.runlog"]
    assert len(warnings) == 1 and str(tmp_path / "metrics.jsonl") in warnings[0] and "last line" in warnings[0]
    assert comparable(strict_json(tmp_path / "metrics.jsonl")) == uninterrupted
    assert not temp_files(tmp_path)


@pytest.mark.parametrize("damage", [b"{\"epoch\": 2, \"sta", b"\x00\x00\x00\x00", b"[1, 2]", b'{"epoch": 2, "x": NaN}'],
                         ids=["cut", "zeros", "not_a_record", "bare_nan"])
def test_only_a_damaged_last_line_counts_as_torn(tmp_path: Path, damage: bytes,
                                                caplog: pytest.LogCaptureFixture) -> None:
    good = [json.dumps({"epoch": n, "stage": "head", "val/acc1": 0.5}).encode() for n in (1, 2)]
    metrics = tmp_path / "metrics.jsonl"

    metrics.write_bytes(b"\n".join([good[0], damage]))  # last line: dropped, with a warning
    with caplog.at_level(logging.WARNING, logger="transfer_cli.runs.runlog"):
        assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]
    assert f"{metrics}: dropped its last line (line 2" in caplog.text

    metrics.write_bytes(b"\n".join([good[0], damage, good[1]]) + b"\n")  # not the last: refused, naming it
    with pytest.raises(TransferError, match=rf"^{re.escape(str(metrics))} line 2 is damaged [^\n]*$"):
        read_metrics(tmp_path)


def test_resume_refuses_a_history_that_lacks_the_checkpointed_epochs(tmp_path: Path) -> None:
    """A last line lost after its epoch was checkpointed (a hand edit, a copied run) must not vanish silently."""
    train(compose_train(RUN), tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    with pytest.raises(TransferError, match=r"metrics.jsonl holds epochs \[1\] but checkpoints/last.pt completed "
                                            r"epochs 1 to 2"):
        train(compose_train(RUN), tmp_path, resume=state)


# --------------------------------------------------------------------------- non-finite numbers


def test_a_non_finite_val_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """The model gives NaN on validation images from epoch 2 on (training itself stays finite)."""
    train_forwards = []

    def runner_with_nan_validation(runner: Any) -> Any:
        def nan_when_validating(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if module.training:
                train_forwards.append(1)
                return output
            return output * math.nan if len(train_forwards) > STEPS_PER_EPOCH else output

        runner.model.register_forward_hook(nan_when_validating)
        return runner

    with pytest.raises(TransferError, match=r"^non-finite val loss after epoch 2: training stopped; "
                                            r"checkpoints/last.pt keeps epoch 1\. "):
        # fine_tune: no head-only stage on cached features, one model
        train(compose_train(RUN), tmp_path, adapt_runner=runner_with_nan_validation)

    summary = strict_json(tmp_path / "summary.json")
    assert summary["status"] == "failed" and "non-finite val loss after epoch 2" in summary["stop_reason"]
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1
    assert [r["epoch"] for r in strict_json(tmp_path / "metrics.jsonl")] == [1]
    strict_json(tmp_path / "plan.json")
    for name in ("last.pt", "best.pt"):
        state = checkpoint.load(tmp_path / "checkpoints" / name)
        assert state["progress"]["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("write", [
    lambda run_dir, value: runlog.write_json(run_dir / "summary.json", {"val": {"loss": [0.5, value]}}),
    lambda run_dir, value: runlog.append_metrics(run_dir, {"epoch": 1, "val": {"loss": [0.5, value]}}),
    lambda run_dir, value: runlog.write_metrics(run_dir, [{"epoch": 1, "val": {"loss": [0.5, value]}}]),
], ids=["write_json", "append_metrics", "write_metrics"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_json_writers_refuse_non_finite_numbers_and_write_nothing(tmp_path: Path, write: Callable,
                                                                  value: float) -> None:
    with pytest.raises(ValueError, match=r"val/loss/1 is not a finite number"):
        write(tmp_path, value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- SIGTERM from outside, as SLURM sends it

PREEMPTED = ["experiment=smoke", "dataset.select_fraction=0",
             "strategy=fine_tune", "augment=basic", "trainer.num_workers=2", "trainer.epochs=5"]


def transfer_command(tmp_path: Path, *args: str, **popen: Any) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "TRANSFER_CACHE": str(tmp_path / "feature-cache")}
    command = Path(sys.executable).parent / "transfer"  # the installed command of this venv
    return subprocess.Popen([str(command), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def wait_for_epochs(process: subprocess.Popen, metrics: Path, epochs: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= epochs):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training ended (rc {process.returncode}) or stalled before epoch {epochs}: "
                        f"{process.communicate()[1][-2000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_epoch_3_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """SLURM signals the whole process group (the DataLoader workers too) at a moment of its choosing."""
    run_dir = tmp_path / "preempted"
    process = transfer_command(tmp_path, "train", *PREEMPTED, f"hydra.run.dir={run_dir}", start_new_session=True)
    wait_for_epochs(process, run_dir / "metrics.jsonl", 2)
    epoch_seconds = read_metrics(run_dir)[-1]["seconds"]
    delay = random.Random().uniform(0, 0.9 * epoch_seconds)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    _, err = process.communicate(timeout=60)
    took = time.monotonic() - signalled

    context = f"SIGTERM {delay:.2f}s into epoch 3 ({epoch_seconds:.1f}s per epoch): {err[-3000:]}"
    assert process.returncode == 143, context
    assert took < 15, context  # a step, a checkpoint, the workers' shutdown, on a loaded machine
    assert f"continue with: transfer resume {run_dir}" in err and "Traceback" not in err, context
    assert not temp_files(run_dir), context
    assert not (run_dir / "summary.json").exists(), context
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["epoch"] >= 2, context

    resumed = transfer_command(tmp_path, "resume", str(run_dir))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    # A process of its own: persistent workers (they ignore SIGTERM) left in this one can block its exit.
    reference = tmp_path / "uninterrupted"
    uninterrupted = transfer_command(tmp_path, "train", *PREEMPTED, f"hydra.run.dir={reference}")
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(reference)), context


def test_sigterm_while_the_run_is_built_ends_it_with_143_and_a_line(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding images or downloading weights takes minutes: a SIGTERM then must not kill the run silently."""
    real_prepare = train_module.prepare

    def preempted_prepare(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(train_module, "prepare", preempted_prepare)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="terminated by SIGTERM before training started") as stopped:
        train(compose_train(RUN), tmp_path)
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / "checkpoints").exists()
