"""DDP under torchrun: sharded sampling, one run dir, rank-0 files, reduced metrics, resume.

The torchrun tests run 2 CPU processes with the gloo backend (marked slow: each process
imports torch and timm); the sampler tests check the sharding arithmetic in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from transfer_cli.core.errors import TransferError
from transfer_cli.data.loaders import EpochSampler, ShardSampler, make_loader, steps_per_epoch
from transfer_cli.parallel import distributed
from transfer_cli.runs.runlog import read_metrics
from transfer_cli.training.loop import Tally
from transfer_cli.training.run import train

from conftest import FAST, REPO, compose_train
from helpers import comparable


TORCHRUN = Path(sys.executable).parent / "torchrun"
DDP = FAST + ["trainer.epochs=6", "trainer.device=cpu"]  # global batch 16: 8 per process


# --------------------------------------------------------------------------- sharding arithmetic


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("size", [96, 100, 7])
def test_every_step_of_the_shards_is_a_single_process_step(world: int, size: int) -> None:
    batch = 2
    single = list(EpochSampler(size, seed=5))
    shards = [list(EpochSampler(size, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert {len(s) for s in shards} == {size // world}
    steps = size // world // batch
    for step in range(steps):
        together = sorted(i for shard in shards for i in shard[step * batch:(step + 1) * batch])
        assert together == sorted(single[step * batch * world:(step + 1) * batch * world])


def test_resume_skip_is_per_process() -> None:
    sampler = EpochSampler(96, seed=1, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, skip=2 * 8)  # two steps of 8 images per process
    assert list(sampler) == full[16:] and len(sampler) == 48 - 16


def test_validation_shards_see_every_image_once() -> None:
    seen = Counter(i for r in range(3) for i in ShardSampler(10, r, 3))
    assert seen == Counter(range(10))


def test_sharded_loader_keeps_the_single_process_step_count() -> None:
    data = list(range(100))
    single = make_loader(data, 16, train=True, num_workers=0, seed=0, pin_memory=False)
    shard = make_loader(data, 8, train=True, num_workers=0, seed=0, pin_memory=False, rank=1, world_size=2)
    assert steps_per_epoch(single) == steps_per_epoch(shard) == len(list(shard)) == 6
    val = make_loader(data, 8, train=False, num_workers=0, seed=0, pin_memory=False, rank=1, world_size=2)
    assert sum(len(batch) for batch in val) == 50


def test_single_process_is_untouched() -> None:
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    tally = Tally(__import__("torch").device("cpu"), (1,))
    assert tally.reduced() is tally
    assert distributed.per_process_batch(30) == 30
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_global_batch_must_divide_among_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(TransferError, match="global batch .* 4 processes"):
        distributed.per_process_batch(30)


# --------------------------------------------------------------------------- torchrun, 2 CPU processes


def torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "transfer_cli", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"rc {process.returncode}\n{out}\n{err[-4000:]}"
    return out, err




@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted 2-process run whose dir pattern differs per process without agreement (microseconds)."""
    root = tmp_path_factory.mktemp("ddp")
    out, err = finish(torchrun("train", *DDP, f"hydra.run.dir={root}/runs/" + "${now:%Y-%m-%d_%H-%M-%S.%f}"))
    return {"root": root, "runs": sorted((root / "runs").iterdir()), "stdout": out, "stderr": err}


@pytest.mark.slow
def test_torchrun_two_processes_make_one_run(ddp_run: dict[str, Any], tmp_path: Path) -> None:
    assert len(ddp_run["runs"]) == 1, ddp_run["runs"]
    run_dir = ddp_run["runs"][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["epochs_run"] == 6
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert ddp_run["stdout"].count("run dir:") == 1  # rank 1 prints nothing
    log = (run_dir / "train.log").read_text()
    assert log.count("] - epoch 6 [") == 1 and "data parallel: 2 processes, 8 images per process" in log

    # the same global batch in one process: the head-only first epoch (no BatchNorm in play) matches to
    # float precision; later epochs differ by per-process BatchNorm statistics only
    train(compose_train(DDP), tmp_path / "single")
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(run_dir)
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single] == [1, 2, 3, 4, 5, 6]
    assert ddp[0]["train/loss"] == pytest.approx(single[0]["train/loss"], abs=1e-4)
    assert ddp[0]["val/acc1"] == pytest.approx(single[0]["val/acc1"], abs=1e-6)
    assert abs(summary["reported_val_acc"]
               - json.loads((tmp_path / "single" / "summary.json").read_text())["reported_val_acc"]) <= 0.15


@pytest.mark.slow
def test_a_killed_torchrun_run_resumes_under_torchrun(ddp_run: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    process = torchrun("train", *DDP, f"hydra.run.dir={run_dir}")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no 3 epochs in 240 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # torchrun stops both workers, like a preempted job
    process.communicate(timeout=120)
    assert not (run_dir / "summary.json").exists()

    out, _ = finish(torchrun("resume", str(run_dir)))
    assert "resuming" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    # every rank resumed its own RNG and data position: the uninterrupted run, exactly
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(ddp_run["runs"][0]))
