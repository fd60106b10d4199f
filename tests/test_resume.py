"""Interrupted runs resume exactly: SIGKILL, Ctrl-C, mid-epoch checkpoints, stage boundaries, a full disk."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.cli import main as cli_main
from transfer_cli.runs import checkpoint
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training import fit as trainer
from transfer_cli.training.assemble import prepare
from transfer_cli.training.run import train

from conftest import FAST, REPO, compose_train
from helpers import Crash, comparable, crash_after, finish, start_train, transfer, transfer_env, wait_for_lines


STEPS_PER_EPOCH = 96 // 16  # FAST: 96 training images, batch 16, ragged batch dropped


pytestmark = pytest.mark.usefixtures("fresh_feature_cache")




def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- acceptance: SIGKILL, then resume

KILLED = ["experiment=smoke", "trainer.epochs=6", "dataset.train_size=96", "dataset.val_size=48"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    process = start_train(tmp_path, run_dir, KILLED)
    wait_for_lines(process, tmp_path, run_dir / "metrics.jsonl", 3)
    process.send_signal(signal.SIGKILL)
    finish(process, tmp_path)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()

    resumed = transfer("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    # it continued from a checkpoint (epoch 2 or 3), it did not start again
    assert "resuming" in resumed.stdout and "from epoch 0" not in resumed.stdout
    assert f"run dir: {run_dir}" in resumed.stdout

    train(compose_train(KILLED), tmp_path / "uninterrupted")
    expected = comparable(read_metrics(tmp_path / "uninterrupted"))
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert comparable(read_metrics(run_dir)) == expected


# --------------------------------------------------------------------------- mid-epoch checkpoints


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], list[dict[str, Any]]]:
    """Comparable metrics of an uninterrupted in-process run, one run per distinct override list."""
    done: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def metrics(overrides: list[str]) -> list[dict[str, Any]]:
        key = tuple(overrides)
        if key not in done:
            run_dir = tmp_path_factory.mktemp("uninterrupted")
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("TRANSFER_CACHE", str(run_dir / "feature-cache"))
                train(compose_train(overrides), run_dir)
            done[key] = comparable(read_metrics(run_dir))
        return done[key]

    return metrics


def crash_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Callable, overrides: list[str],
                     epoch: int, step: int = 4) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Metrics of an uninterrupted run and of one crashed after a mid-epoch checkpoint, then resumed in-process."""
    overrides = overrides + ["trainer.checkpoint_every_steps=2"]
    expected = reference(overrides)

    crashed = tmp_path / "b"
    with monkeypatch.context() as patch:
        crash_after(patch, epoch=epoch, step=step)
        with pytest.raises(Crash):
            train(compose_train(overrides), crashed)
    state = checkpoint.load(crashed / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (epoch - 1, step), "a mid-epoch checkpoint"
    assert state["tally"] is not None and state["tally"]["count"] == step * 16
    assert len(read_metrics(crashed)) == epoch - 1

    train(compose_train(overrides), crashed, resume=state)
    resumed = read_metrics(crashed)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    return expected, comparable(resumed)


def without_lr(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "lr"} for r in records]


@pytest.mark.parametrize("epoch", [1, 2], ids=["head_stage", "last_block_stage"])
@pytest.mark.slow
def test_mid_epoch_checkpoint_resumes_to_identical_losses_and_accuracies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: Callable, epoch: int) -> None:
    expected, resumed = crash_and_resume(tmp_path, monkeypatch, uninterrupted, FAST, epoch)
    assert without_lr(resumed) == without_lr(expected)


@pytest.mark.slow
def test_mid_epoch_resume_records_the_same_lrs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              uninterrupted: Callable) -> None:
    expected, resumed = crash_and_resume(tmp_path, monkeypatch, uninterrupted, FAST, epoch=2)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in expected]


@pytest.mark.slow
def test_mid_epoch_resume_repeats_random_augmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      uninterrupted: Callable) -> None:
    # horizontal flips only: one draw per image, so a shifted RNG stream never falls back into step
    overrides = FAST + ["augment=basic", "augment.random_resized_crop=null"]
    expected, resumed = crash_and_resume(tmp_path, monkeypatch, uninterrupted, overrides, epoch=2)
    assert without_lr(resumed) == without_lr(expected)


@pytest.mark.slow
def test_mid_epoch_resume_with_accumulated_batches_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            uninterrupted: Callable) -> None:
    """trainer.accumulate_steps=2: 6 batches an epoch make 3 optimizer steps; the checkpoint after batch 4 stands
    at a step boundary, and the resumed run ends with the uninterrupted run's metrics and lrs."""
    expected, resumed = crash_and_resume(tmp_path, monkeypatch, uninterrupted, FAST + ["trainer.accumulate_steps=2"],
                                         epoch=2)
    assert resumed == expected


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_sigint_checkpoints_exits_130_and_resumes_exactly(tmp_path: Path, hydra_in_process: None) -> None:
    """Interrupted in a process of its own, resumed in this one (the SIGKILL test resumes with the command)."""
    overrides = FAST + ["trainer.epochs=4"]
    run_dir = tmp_path / "interrupted"
    process = start_train(tmp_path, run_dir, overrides)
    wait_for_lines(process, tmp_path, run_dir / "metrics.jsonl", 1)
    process.send_signal(signal.SIGINT)
    _, err = finish(process, tmp_path)

    assert process.returncode == 130, err
    assert "interrupted" in err and f"transfer resume {run_dir}" in err
    assert "Traceback" not in err
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] >= 1
    assert not (run_dir / "summary.json").exists()

    assert cli_main(["resume", str(run_dir)]) == 0
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


def test_resume_command_on_a_missing_directory_exits_2_before_loading_torch(tmp_path: Path) -> None:
    code = f"import sys; from transfer_cli.cli import main; code = main(['resume', {str(tmp_path / 'nope')!r}]); " \
           "print('torch' in sys.modules); sys.exit(code)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=transfer_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout.strip() == "False"
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


RESTORE_POINTS = {(1, 0): {"head"}, (2, 0): {"head", "layer4"},  # (epoch, step) -> layer groups trained so far
                  (2, 3): {"stem", "layer1", "layer2", "layer3", "layer4", "head"}}
GRADUAL_STEPS = FAST + ["strategy=gradual", "trainer.checkpoint_every_steps=3"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], dict[str, Any]]:
    """One gradual run (head | layer4 + head | all, 6 steps an epoch): at each restore point, the checkpoint
    it wrote and its live optimizer's groups and head Adam state at that moment."""
    runners: list[Any] = []
    real_save = checkpoint.save_atomic
    seen: dict[tuple[int, int], dict[str, Any]] = {}

    def keep_runner(runner: Any) -> Any:
        runners.append(runner)
        return runner

    def save_and_observe(payload: dict[str, Any], path: Path) -> None:
        real_save(payload, path)
        progress = payload.get("progress") or {}
        point = (progress.get("epoch"), progress.get("step"))
        if path.name == "last.pt" and point in RESTORE_POINTS and point not in seen:
            optimizer = runners[-1].optimizer
            names = {id(p): n for n, p in runners[-1].model.named_parameters()}
            seen[point] = dict(state=checkpoint.load(path), groups=optimizer_view(optimizer, names),
                               head=head_adam_state(optimizer, names))

    run_dir = tmp_path_factory.mktemp("gradual")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_CACHE", str(run_dir / "feature-cache"))
        patch.setattr(checkpoint, "save_atomic", save_and_observe)
        train(compose_train(GRADUAL_STEPS), run_dir / "original", adapt_runner=keep_runner)
    return seen


@pytest.mark.parametrize("epoch,step", list(RESTORE_POINTS),
                         ids=["end_of_head_stage", "end_of_last_block_stage", "inside_all_stage"])
def test_restore_rebuilds_the_optimizer_groups_and_keeps_the_heads_adam_state(
        tmp_path: Path, observed: dict[tuple[int, int], dict[str, Any]], epoch: int, step: int) -> None:
    seen = observed[(epoch, step)]
    assert {g[0] for g in seen["groups"]} == RESTORE_POINTS[(epoch, step)]

    prepared = prepare(compose_train(GRADUAL_STEPS), tmp_path / "restored")
    progress, _, _ = trainer.restore(prepared.setup, seen["state"])
    optimizer = prepared.setup.optimizer.optimizer
    names = {id(p): n for n, p in prepared.setup.model.model.named_parameters()}

    assert (progress.epoch, progress.step) == (epoch, step)
    assert len(optimizer.param_groups) == len(seen["groups"])
    assert optimizer_view(optimizer, names) == seen["groups"]  # same groups, order, parameters and lrs
    restored_head = head_adam_state(optimizer, names)
    assert restored_head and restored_head.keys() == seen["head"].keys()
    for name, state in seen["head"].items():
        assert state.keys() == restored_head[name].keys()
        for key, value in state.items():
            assert torch.equal(restored_head[name][key], value), (name, key)
        # the head kept its Adam state through every stage boundary: it has stepped every step so far
        assert float(state["step"]) == epoch * STEPS_PER_EPOCH + step


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
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if not n.startswith("frozen-")] == ["best.pt", "last.pt"] and len(names) <= 3, names
    last = checkpoint.load(folder / "last.pt")
    assert last["progress"]["epoch"] == 1 and last["progress"]["step"] == 0
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert checkpoint.load(folder / "best.pt")["epoch"] == 1
