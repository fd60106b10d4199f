"""Interrupted runs resume exactly: SIGKILL, Ctrl-C, mid-epoch checkpoints, stage boundaries, a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, REPO, compose_train
import transfer_cli.train as train_module
from transfer_cli import checkpoint, trainer
from transfer_cli.cli import main as cli_main
from transfer_cli.runlog import read_metrics
from transfer_cli.train import prepare, train

STEPS_PER_EPOCH = 96 // 16  # FAST: 96 training images, batch 16, ragged batch dropped


@pytest.fixture(autouse=True)
def _private_feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep any cached backbone features out of the user's home."""
    monkeypatch.setenv("TRANSFER_CACHE", str(tmp_path / "feature-cache"))


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without the timing keys, which differ between any two runs."""
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in records]


def transfer_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "TRANSFER_CACHE": str(tmp_path / "feature-cache")}


def transfer(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transfer_cli", *args], cwd=REPO, env=transfer_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def start_train(tmp_path: Path, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=transfer_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_lines(process: subprocess.Popen, metrics: Path, lines: int, timeout: float = 240) -> None:
    """Poll metrics.jsonl until it has `lines` epochs (fails if the run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            return
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"training ended (rc {process.returncode}) before {lines} epochs:\n{out}\n{err}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"metrics.jsonl did not reach {lines} lines in {timeout}s")


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- acceptance: SIGKILL, then resume

KILLED = ["experiment=smoke", "trainer.epochs=6", "dataset.train_size=96", "dataset.val_size=48"]


def test_sigkilled_run_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    process = start_train(tmp_path, run_dir, KILLED)
    wait_for_lines(process, run_dir / "metrics.jsonl", 3)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()

    resumed = transfer(tmp_path, "resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    # it continued from a checkpoint (epoch 2 or 3), it did not start again
    assert "resuming" in resumed.stdout and "from epoch 0" not in resumed.stdout
    assert f"run dir: {run_dir}" in resumed.stdout

    train(compose_train(KILLED), tmp_path / "uninterrupted")
    expected = comparable(read_metrics(tmp_path / "uninterrupted"))
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert comparable(read_metrics(run_dir)) == expected


# --------------------------------------------------------------------------- mid-epoch checkpoints


class Crash(Exception):
    """Stands for the process dying right after a mid-epoch checkpoint."""


def crash_after(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """Make training raise right after step `step` of epoch `epoch` (after its on_step checkpoint)."""
    real = trainer.train_one_epoch

    def crashing(*args: Any, on_step: Any, description: str, **kwargs: Any) -> Any:
        def step_then_crash(done: int) -> None:
            on_step(done)
            if description == f"epoch {epoch}" and done == step:
                raise Crash(f"{description} step {done}")

        return real(*args, on_step=step_then_crash, description=description, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", crashing)


@pytest.mark.parametrize("epoch", [1, 2], ids=["head_stage", "last_block_stage"])
def test_mid_epoch_checkpoint_resumes_to_identical_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           epoch: int) -> None:
    overrides = FAST + ["augment=basic", "trainer.checkpoint_every_steps=2"]  # augmentation draws on the RNGs
    train(compose_train(overrides), tmp_path / "a")

    crashed = tmp_path / "b"
    with monkeypatch.context() as patch:
        crash_after(patch, epoch=epoch, step=4)
        with pytest.raises(Crash):
            train(compose_train(overrides), crashed)
    state = checkpoint.load(crashed / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (epoch - 1, 4)
    assert len(read_metrics(crashed)) == epoch - 1

    train(compose_train(overrides), crashed, resume=state)
    assert comparable(read_metrics(crashed)) == comparable(read_metrics(tmp_path / "a"))
    assert [r["epoch"] for r in read_metrics(crashed)] == [1, 2, 3]


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_sigint_checkpoints_exits_130_and_resumes_exactly(tmp_path: Path) -> None:
    overrides = FAST + ["trainer.epochs=4"]
    run_dir = tmp_path / "interrupted"
    process = start_train(tmp_path, run_dir, overrides)
    wait_for_lines(process, run_dir / "metrics.jsonl", 1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)

    assert process.returncode == 130, err
    assert f"transfer resume {run_dir}" in err
    assert "Traceback" not in err
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] >= 1
    assert not (run_dir / "summary.json").exists()

    resumed = transfer(tmp_path, "resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    train(compose_train(overrides), tmp_path / "uninterrupted")
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(tmp_path / "uninterrupted"))


# --------------------------------------------------------------------------- `transfer resume` edge cases


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """A finished run directory as `transfer train` leaves it (config.yaml included)."""
    run_dir = tmp_path / "finished"
    cfg = compose_train(FAST + ["strategy=fine_tune", "trainer.epochs=1"])
    run_dir.mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    train(cfg, run_dir)
    return run_dir


def test_resuming_a_finished_run_reports_it_and_changes_nothing(finished_run: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(finished_run)
    time.sleep(0.01)
    assert cli_main(["resume", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and str(finished_run) in out
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("what", ["missing", "not_a_run"])
def test_resuming_a_missing_or_foreign_directory_is_a_one_line_error(tmp_path: Path, what: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / what
    if what == "not_a_run":
        target.mkdir()
    assert cli_main(["resume", str(target)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transfer: error:") and str(target) in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / what / "train.log").exists()


@pytest.mark.slow
def test_resume_command_on_a_missing_directory_exits_2(tmp_path: Path) -> None:
    result = transfer(tmp_path, "resume", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- optimizer state across stages


def optimizer_view(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[tuple]:
    """Each param group as (layer group, kind, lr, parameter names)."""
    return [(g["layer_group"], g["kind"], g["lr"], tuple(names[id(p)] for p in g["params"]))
            for g in optimizer.param_groups]


def head_adam_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict[str, torch.Tensor]]:
    return {names[id(p)]: {k: v.detach().clone() for k, v in optimizer.state[p].items()}
            for g in optimizer.param_groups if g["layer_group"] == "head" for p in g["params"]}


@pytest.mark.parametrize("epoch,step", [(1, 0), (2, 0), (2, 3)],
                         ids=["end_of_head_stage", "end_of_last_block_stage", "inside_all_stage"])
def test_restore_rebuilds_the_optimizer_groups_and_keeps_the_heads_adam_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """gradual: head (epoch 1) | layer4 + head (epoch 2) | all (epoch 3); 6 steps an epoch."""
    cfg = compose_train(FAST + ["strategy=gradual", "trainer.checkpoint_every_steps=3"])
    runners: list[Any] = []
    real_runner = train_module._runner

    def keep_runner(*args: Any, **kwargs: Any) -> Any:
        runners.append(real_runner(*args, **kwargs))
        return runners[-1]

    seen: dict[str, Any] = {}
    real_save = checkpoint.save_atomic

    def save_and_observe(payload: dict[str, Any], path: Path) -> None:
        real_save(payload, path)
        progress = payload.get("progress") or {}
        if path.name == "last.pt" and (progress.get("epoch"), progress.get("step")) == (epoch, step) and "state" not in seen:
            optimizer = runners[-1].optimizer
            names = {id(p): n for n, p in runners[-1].model.named_parameters()}
            seen.update(state=checkpoint.load(path), groups=optimizer_view(optimizer, names),
                        head=head_adam_state(optimizer, names))

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_runner", keep_runner)
        patch.setattr(checkpoint, "save_atomic", save_and_observe)
        train(cfg, tmp_path / "original")
    assert "state" in seen

    prepared = prepare(cfg, tmp_path / "restored")
    progress, _, _ = trainer.restore(prepared.setup, seen["state"])
    optimizer = prepared.setup.optimizer.optimizer
    names = {id(p): n for n, p in prepared.model.model.named_parameters()}

    assert (progress.epoch, progress.step) == (epoch, step)
    assert len(optimizer.param_groups) == len(seen["groups"])
    assert optimizer_view(optimizer, names) == seen["groups"]
    restored_head = head_adam_state(optimizer, names)
    assert restored_head.keys() == seen["head"].keys() and restored_head
    for name, state in seen["head"].items():
        assert state.keys() == restored_head[name].keys()
        for key, value in state.items():
            assert torch.equal(restored_head[name][key], value), (name, key)
        # the head kept its Adam state through every stage boundary: it has stepped every step so far
        assert float(state["step"]) == epoch * STEPS_PER_EPOCH + step
    trained = {(1, 0): {"head"}, (2, 0): {"head", "layer4"},
               (2, 3): {"stem", "layer1", "layer2", "layer3", "layer4", "head"}}[(epoch, step)]
    assert {g[0] for g in seen["groups"]} == trained


# --------------------------------------------------------------------------- disk full


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_intact(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_save, real_save_atomic = torch.save, checkpoint.save_atomic
    target: list[Path] = []
    last_writes: list[Path] = []

    def save_atomic_to(payload: dict[str, Any], path: Path) -> None:
        target[:] = [Path(path)]
        try:
            real_save_atomic(payload, path)
        finally:
            target.clear()

    def save_until_full(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        if target and target[0].name == "last.pt":
            last_writes.append(target[0])
            if len(last_writes) == 2:
                file.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(OSError) as raised:
        patch.setattr(checkpoint, "save_atomic", save_atomic_to)
        patch.setattr(checkpoint.torch, "save", save_until_full)
        train(compose_train(FAST), tmp_path)
    assert raised.value.errno == errno.ENOSPC

    assert len(last_writes) == 2
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]
    last = checkpoint.load(folder / "last.pt")
    assert last["progress"]["epoch"] == 1 and last["progress"]["step"] == 0
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert checkpoint.load(folder / "best.pt")["epoch"] == 1
