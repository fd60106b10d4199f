"""A user's mistakes, and a disk that is full or read-only, end in one `transfer: error:` line naming the key
or file, exit 2, never a traceback: values out of the libraries' range, a batch of one for BatchNorm statistics,
eval overrides that do not resolve, damaged run files on resume, a config.yaml too big to expand. Each is refused
before training where it is knowable up front, and the run directory is left as it was. Library warnings are one
line too.

One interrupted run (epoch 1 of 2 checkpointed, no summary) is trained per module; each test
works on its own copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from transfer_cli.cli import main, one_line_warning
from transfer_cli.core.errors import failure
from transfer_cli.training import fit as trainer
from transfer_cli.training.run import train

from conftest import compose_train
from helpers import fresh_copy, one_error_line, trained_in_process, tree_snapshot


TINY = ["experiment=smoke", "dataset.select_fraction=0",
        "strategy=fine_tune", "dataset.train_size=64", "dataset.val_size=32", "trainer.epochs=2",
        "trainer.batch_size=32"]


class Crash(Exception):
    """Stands for the process dying after epoch 1's checkpoint."""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed during epoch 2: checkpoints of epoch 1, one metrics line, no summary.json."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    real = trainer.train_one_epoch

    def crash_in_epoch_2(*args: Any, description: str, **kwargs: Any) -> Any:
        if description == "epoch 2":
            raise Crash
        return real(*args, description=description, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "train_one_epoch", crash_in_epoch_2)
        with pytest.raises(Crash):
            trained_in_process(run_dir, compose_train(TINY))
    return run_dir


@pytest.fixture
def run(interrupted: Path, tmp_path: Path) -> Path:
    return fresh_copy(interrupted, tmp_path)


def one_error(capsys: pytest.CaptureFixture[str], code: int, *names: object) -> str:
    """The single `transfer: error:` line of a command that exited 2, naming each of `names`."""
    out, err = capsys.readouterr()
    return one_error_line(code, err, *names, out=out)


# --------------------------------------------------------------------------- values the libraries refuse


@pytest.mark.parametrize(("override", "key", "bound"), [
    ("trainer.seed=1180591620717411303424", "trainer.seed", "1099511627775"),  # 2**70
    ("trainer.seed=1125899906842624", "trainer.seed", "1099511627775"),  # 2**50: once past the first epoch
    ("trainer.seed=-1099511627777", "trainer.seed", "-1099511627776"),
    ("dataset.split_seed=1099511627776", "dataset.split_seed", "1099511627775"),
    ("transforms.image_size=1", "transforms.image_size", "32"),
    ("transforms.image_size=31", "transforms.image_size", "32"),
    ("transforms.image_size=100000", "transforms.image_size", "4096"),
    ("dataset.image_size=100000", "dataset.image_size", "4096"),
    ("trainer.early_stopping.monitor=val/acc", "trainer.early_stopping.monitor", "val/acc1"),
])
def test_a_value_out_of_the_libraries_range_is_refused_before_a_run_dir(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], override: str, key: str,
        bound: str) -> None:
    code = main(["train", *TINY, override, f"hydra.run.dir={tmp_path / 'run'}"])
    one_error(capsys, code, key, bound)
    assert not (tmp_path / "run").exists()


def test_a_sweep_value_out_of_range_is_refused_before_job_0_trains(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    code = main(["train", "-m", *TINY, "trainer.seed=1,1180591620717411303424", f"hydra.sweep.dir={sweep}"])
    one_error(capsys, code, "trainer.seed=1180591620717411303424")
    assert not sweep.exists()


@pytest.mark.parametrize("override", ["trainer.seed=-5", "trainer.seed=1099511627775", "dataset.split_seed=0",
                                      "transforms.image_size=32", "trainer.early_stopping.monitor=val/loss"])
def test_values_at_the_edges_of_the_ranges_compose(override: str) -> None:
    compose_train([*TINY, override])


# --------------------------------------------------------------------------- known once the data is


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "named"), [
    (["trainer.batch_size=1"], "trainer.batch_size=1"),
    (["dataset.train_size=1", "dataset.num_classes=2"], "the training split has 1 image"),
    (["strategy=feature_extract", "strategy.bn=reestimate", "trainer.batch_size=1"], "bn=reestimate"),
])
def test_a_batch_of_one_for_batchnorm_statistics_is_refused_before_training(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], overrides: list[str],
        named: str) -> None:
    code = main(["train", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    line = one_error(capsys, code, named, "strategy.bn=frozen_stats")
    assert "BatchNorm" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_batch_of_one_with_frozen_batchnorm_goes_through(tmp_path: Path, hydra_in_process: None) -> None:
    """feature_extract trains the head alone: BatchNorm layers stay in eval mode, a batch of one is fine."""
    assert main(["train", *TINY, "strategy=feature_extract", "trainer.batch_size=1", "dry_run=true",
                 f"hydra.run.dir={tmp_path / 'run'}"]) == 0


@pytest.mark.slow
def test_early_stopping_on_top5_with_5_classes_or_fewer_is_refused_before_training(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", *TINY, "trainer.early_stopping.patience=1", "trainer.early_stopping.monitor=val/acc5",
                 f"hydra.run.dir={tmp_path / 'run'}"])
    one_error(capsys, code, "trainer.early_stopping.monitor=val/acc5", "4 classes", "val/acc1")
    assert not (tmp_path / "run").exists()
    assert main(["train", *TINY, "dataset.num_classes=6", "trainer.early_stopping.patience=1",
                 "trainer.early_stopping.monitor=val/acc5", "dry_run=true", f"hydra.run.dir={tmp_path / 'five'}"]) == 0


# --------------------------------------------------------------------------- eval overrides


@pytest.mark.slow
@pytest.mark.parametrize("override", ["dataset.root=${nope}", "trainer.batch_size=${trainer.batch_size}",
                                      "dataset.root=${oc.env:TRANSFER_TEST_UNSET_VARIABLE}"])
def test_an_eval_override_that_does_not_resolve_is_one_line(run: Path, capsys: pytest.CaptureFixture[str],
                                                            override: str) -> None:
    before = tree_snapshot(run)
    one_error(capsys, main(["eval", str(run), override]), f"override '{override}'")
    assert tree_snapshot(run) == before


# --------------------------------------------------------------------------- damaged run files on resume


def _summary_a_folder(run_dir: Path) -> Path:
    (run_dir / "summary.json").mkdir()
    return run_dir / "summary.json"


def _summary_a_list(run_dir: Path) -> Path:
    (run_dir / "summary.json").write_text("[1, 2]\n")
    return run_dir / "summary.json"


def _edit_record(run_dir: Path, **changes: Any) -> str:
    import json

    record = json.loads((run_dir / "metrics.jsonl").read_text())
    record.update(changes)
    (run_dir / "metrics.jsonl").write_text(json.dumps({k: v for k, v in record.items() if v is not None}) + "\n")
    return f"{run_dir / 'metrics.jsonl'} line 1"


def _metrics_a_folder(run_dir: Path) -> Path:
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").mkdir()
    return run_dir / "metrics.jsonl"


DAMAGE = {
    "summary a folder": _summary_a_folder,
    "summary a list": _summary_a_list,
    "record lacks a key": lambda run_dir: _edit_record(run_dir, **{"train/loss": None}),
    "string epoch": lambda run_dir: _edit_record(run_dir, epoch="1"),
    "string loss": lambda run_dir: _edit_record(run_dir, **{"val/loss": "0.5"}),
    "metrics a folder": _metrics_a_folder,
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_over_a_damaged_run_file_is_refused_before_training(
        run: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    named = DAMAGE[damage](run)
    before = tree_snapshot(run)
    one_error(capsys, main(["resume", str(run)]), named)
    assert tree_snapshot(run) == before


@pytest.mark.slow
def test_a_sweep_rerun_resuming_over_a_record_that_lacks_a_key_is_refused_before_training(run: Path) -> None:
    """A sweep job resumes through train() itself: the same check, before the first step."""
    from transfer_cli.core.errors import TransferError
    from transfer_cli.runs.rundir import load_last_checkpoint

    named = _edit_record(run, **{"val/acc1": None})
    state = load_last_checkpoint(run)
    checkpoints = tree_snapshot(run / "checkpoints")
    with pytest.raises(TransferError, match=f"^{named} is damaged \\(epoch 1 has no val/acc1\\)"):
        train(compose_train(TINY), run, resume=state)
    assert tree_snapshot(run / "checkpoints") == checkpoints


# --------------------------------------------------------------------------- a read-only or a full disk


def _mount_tmpfs(folder: Path, size: str) -> None:
    """A small tmpfs at `folder`, or a skip where this process may not mount one."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@pytest.mark.slow
def test_resume_in_a_read_only_run_dir_is_refused_before_training(
        interrupted: Path, tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    try:
        shutil.copytree(interrupted, disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        before = tree_snapshot(disk / "run")
        one_error(capsys, main(["resume", str(disk / "run")]), f"{disk / 'run'} is not writable")
        assert tree_snapshot(disk / "run") == before
    finally:
        _unmount(disk)


@pytest.mark.slow
def test_a_full_disk_during_a_resumed_run_says_so_and_keeps_the_checkpoints(
        interrupted: Path, tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    try:
        run_dir = disk / "run"
        shutil.copytree(interrupted, run_dir)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - 200_000))  # room for the logs, not for a checkpoint
        checkpoints = tree_snapshot(run_dir / "checkpoints")
        line = one_error(capsys, main(["resume", str(run_dir)]), "no space left on device",
                         f"transfer resume {run_dir}")
        assert tree_snapshot(run_dir / "checkpoints") == checkpoints
        assert not (run_dir / "summary.json").exists() and not (run_dir / "error.log").exists(), line

        (disk / "filler").unlink()
        assert main(["resume", str(run_dir)]) == 0
        assert '"status": "finished"' in (run_dir / "summary.json").read_text()
    finally:
        _unmount(disk)


def test_a_full_disk_under_a_library_error_is_the_users_to_fix(tmp_path: Path) -> None:
    """torch.save reports a full disk as a RuntimeError raised while handling the OSError; an atomic write's
    temp file stands for the file it replaces."""
    temp = tmp_path / "checkpoints" / ".last.pt.k2j4h1.tmp"
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3064064 vs 3063952")
    error.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))
    code, line = failure(error, None, f"; continue with: transfer resume {tmp_path}", tmp_path)
    assert code == 2
    assert line == (f"transfer: error: no space left on device writing {tmp_path / 'checkpoints' / 'last.pt'}: "
                    f"free space, then continue with: transfer resume {tmp_path}")
    code, line = failure(ValueError("a bug"), tmp_path / "error.log")
    assert code == 1 and line.startswith("transfer: internal error (ValueError: a bug)")


# --------------------------------------------------------------------------- a YAML alias bomb


def _laughs(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


CONFIGS = {
    "billion laughs": (_laughs(), "expands to over 100,000 YAML nodes"),
    "an alias inside its anchor": ("a: &a [*a]\n", "expands to over 100,000 YAML nodes"),
    "nested 5000 deep": ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "over a megabyte": ("x: '" + "a" * 1_100_000 + "'\n", "over the 1,000,000"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_eval_of_a_config_yaml_too_big_to_expand_is_one_line_and_fast(
        run: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    text, says = CONFIGS[kind]
    (run / "config.yaml").write_text(text)
    before = tree_snapshot(run)
    started = time.perf_counter()
    one_error(capsys, main(["eval", str(run)]), run / "config.yaml", says)
    # unguarded, the laughs expand for hours: a bound far above a loaded machine's seconds still catches that
    assert time.perf_counter() - started < 60
    assert tree_snapshot(run) == before


# --------------------------------------------------------------------------- library warnings


def test_a_warning_is_one_line() -> None:
    assert main(["--version"]) == 0
    assert warnings.formatwarning is one_line_warning
    text = warnings.formatwarning(UserWarning("first line\n  second line"), UserWarning, "/lib/x.py", 3, "warn(...)")
    assert text == "transfer: warning: first line second line (UserWarning)\n"


@pytest.mark.slow
def test_pils_decompression_bomb_warning_is_one_line(run: Path, tmp_path: Path) -> None:
    """A real library warning from a command, in a process of its own (pytest records warnings itself)."""
    from PIL import Image

    image = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (200, 10, 10)).save(image)
    script = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 6000\n"  # 10000 pixels: warned, not refused
              "from transfer_cli.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "predict", str(run), str(image)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "Warning" in line or "warn" in line] == [
        "transfer: warning: Image size (10000 pixels) exceeds limit of 6000 pixels, could be decompression bomb "
        "DOS attack. (DecompressionBombWarning)"]
