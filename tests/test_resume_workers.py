"""Exact resume with DataLoader workers: augmentation is a function of (seed, epoch, sample index).

Persistent workers keep their RNG across epochs and a resumed run starts fresh ones, so anything
drawn from a worker's RNG stream (or the base seed DataLoader draws from the global RNG when it
starts workers) would differ between an uninterrupted run and a resumed one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.runs import checkpoint, runlock
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import Crash, comparable, crash_after, finish, start_train, transfer, wait_for_lines


# The acceptance case: every parameter trains, random crops and flips run in two persistent workers.
ACCEPTANCE = ["experiment=smoke", "dataset.select_fraction=0",
              "strategy=fine_tune", "augment=basic", "trainer.num_workers=2", "trainer.epochs=5"]
STEPS = 384 // 16  # smoke: 384 training images, batch 16
# Small in-process runs where the main process's RNG also matters: dropout and MixUp.
RANDOM = ["experiment=smoke", "dataset.select_fraction=0",
          "strategy=fine_tune", "augment=basic", "head.dropout=0.3", "augment.mixup_alpha=0.2",
          "dataset.train_size=32", "dataset.val_size=16"]


def uninterrupted(overrides: list[str], run_dir: Path) -> list[dict[str, Any]]:
    train(compose_train(overrides), run_dir)
    return comparable(read_metrics(run_dir))


@pytest.fixture(scope="module")
def acceptance_reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return uninterrupted(ACCEPTANCE, tmp_path_factory.mktemp("uninterrupted"))


def progress_of(run_dir: Path) -> tuple[int, int]:
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    return state["progress"]["epoch"], state["progress"]["step"]


def wait_for_checkpoint(process: Any, run_dir: Path, epoch: int, mid_epoch: bool, timeout: float = 240) -> None:
    """Poll last.pt (saved atomically: always whole) until it is epoch `epoch`'s, or one inside the next epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        done, step = progress_of(run_dir)
        if done == epoch and (step > 0 or not mid_epoch):
            return
        time.sleep(0.02)
    pytest.fail(f"no checkpoint at epoch {epoch} (mid_epoch={mid_epoch}) in {timeout}s (rc {process.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("every", [None, 2], ids=["epoch_checkpoints", "checkpoint_every_2_steps"])
def test_sigkill_in_epoch_3_with_workers_resumes_to_the_uninterrupted_metrics(
        tmp_path: Path, acceptance_reference: list[dict[str, Any]], every: int | None) -> None:
    """Killed at a random moment of epoch 3: from the epoch-2 checkpoint, or from a mid-epoch one."""
    overrides = ACCEPTANCE + ([f"trainer.checkpoint_every_steps={every}"] if every else [])
    run_dir = tmp_path / "killed"
    process = start_train(tmp_path, run_dir, overrides)
    wait_for_lines(process, tmp_path, run_dir / "metrics.jsonl", 2)
    epoch_seconds = read_metrics(run_dir)[-1]["seconds"]
    wait_for_checkpoint(process, run_dir, epoch=2, mid_epoch=bool(every))
    delay = random.uniform(0.0, 0.4) * epoch_seconds
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    finish(process, tmp_path)
    where = f"killed {delay:.2f}s into epoch 3 (epochs take {epoch_seconds:.2f}s)"
    assert len(read_metrics(run_dir)) == 2, f"{where}: epoch 3 had already ended"
    epoch, step = progress_of(run_dir)
    assert epoch == 2 and (0 < step < STEPS if every else step == 0), f"{where}: last.pt at {epoch, step}"

    assert runlock.holder(run_dir) is None, "the killed run's DataLoader workers must not keep its lock"
    resumed = transfer("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == acceptance_reference, f"{where}, resumed from step {step}"


@pytest.mark.slow
def test_the_metrics_do_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    """One run in the main process, one in two persistent workers: same augmentation, dropout, MixUp."""
    overrides = RANDOM + ["trainer.epochs=2"]
    in_main = uninterrupted(overrides + ["trainer.num_workers=0"], tmp_path / "main")
    in_workers = uninterrupted(overrides + ["trainer.num_workers=2"], tmp_path / "workers")
    assert in_workers == in_main


@pytest.mark.slow
def test_dropout_and_mixup_with_workers_resume_exactly_at_an_epoch_boundary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh workers in the resumed run must not shift the main process's RNG (dropout, MixUp) in epoch 3."""
    overrides = RANDOM + ["trainer.num_workers=2", "trainer.epochs=3"]
    expected = uninterrupted(overrides, tmp_path / "uninterrupted")
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_after(patch, epoch=2, step=1)
        with pytest.raises(Crash):
            train(compose_train(overrides), crashed)
    state = checkpoint.load(crashed / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 0), "the epoch-1 checkpoint"
    train(compose_train(overrides), crashed, resume=state)
    assert comparable(read_metrics(crashed)) == expected


class Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(3, 8, 8), index


def noisy(image: torch.Tensor) -> torch.Tensor:
    return image + torch.rand(()) + random.random()


def by_sample(loader: Any) -> dict[int, float]:
    return {label: image.sum().item() for images, labels in loader for image, label in zip(images, labels.tolist())}


def test_workers_outlive_sigint_and_sigterm_so_the_main_process_decides() -> None:
    """Ctrl-C and SLURM signal the whole process group: a worker that died would crash the next step."""
    loader = make_loader(TransformedDataset(Images(), noisy), 4, train=True, num_workers=2, seed=0,
                         pin_memory=False)
    first = by_sample(loader)
    workers = loader._iterator._workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    assert by_sample(loader) == first


def test_keyed_samples_leave_the_callers_rng_untouched() -> None:
    """With num_workers=0 augmentation runs in the main process: dropout and MixUp must not see it."""
    loader = make_loader(TransformedDataset(Images(), noisy), 4, train=True, num_workers=0, seed=0, pin_memory=False)
    torch.manual_seed(1)
    random.seed(1)
    expected = torch.rand(()), random.random()
    torch.manual_seed(1)
    random.seed(1)
    list(loader)
    assert (torch.rand(()), random.random()) == expected


def test_a_sample_is_augmented_by_seed_epoch_and_index_alone() -> None:
    """Skipping a resumed epoch's first samples changes none of the others; the next epoch draws anew."""
    loader = make_loader(TransformedDataset(Images(), noisy), 2, train=True, num_workers=0, seed=0, pin_memory=False)
    loader.sampler.set_epoch(3)
    full = by_sample(loader)
    loader.sampler.set_epoch(3, skip=4)
    rest = by_sample(loader)
    assert len(rest) == 4 and rest == {label: full[label] for label in rest}
    loader.sampler.set_epoch(4)
    assert all(value != full[label] for label, value in by_sample(loader).items())
    in_workers = make_loader(TransformedDataset(Images(), noisy), 2, train=True, num_workers=2, seed=0,
                             pin_memory=False)
    in_workers.sampler.set_epoch(3)
    assert by_sample(in_workers) == full


@pytest.mark.slow
def test_a_process_exits_while_its_workers_are_alive(tmp_path: Path) -> None:
    """Workers ignore SIGTERM, and multiprocessing SIGTERMs live daemonic workers at exit and waits:
    without our exit hook, a process leaving a loader's workers running never ends."""
    script = tmp_path / "exit_with_workers.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from transfer_cli.data.loaders import make_loader\n"
        "loader = make_loader(TensorDataset(torch.zeros(8, 2), torch.zeros(8)), 2, train=True, num_workers=2,\n"
        "                     seed=0, pin_memory=False)\n"
        "batches = iter(loader)\n"
        "next(batches)\n")
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
