"""The integrity of what a run reads back from disk: cached features serve only the backbone weights they were
computed from (never a stage name), and a feature-cache entry or checkpoint whose bytes changed on disk is
recomputed (the cache) or refused in one line (every reader of a checkpoint), never served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transfer_cli
from transfer_cli.cli import main
from transfer_cli.core.errors import TransferError
from transfer_cli.runs import checkpoint

from conftest import REPO, compose_train
from helpers import assert_same_metrics, fresh_copy, trained_in_process


TINY = ["experiment=smoke", "dataset.train_size=64", "dataset.val_size=32", "trainer.batch_size=32",
        "dataset.select_fraction=0"]
HEAD = "{name:head,epochs:1,train:[head],lr:1.0e-3}"
# head-only stages that share a name, around one that trains the backbone (and its BatchNorm statistics)
HEAD_ALL_HEAD = f"strategy.stages=[{HEAD},{{name:all,epochs:1,train:[all],lr:1.0e-3}},{HEAD}]"


def _train(run_dir: Path, *overrides: str) -> Path:
    assert main(["train", *TINY, *overrides, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def flip_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the file's largest tensor: its bytes in the zip, never a header."""
    with zipfile.ZipFile(path) as archive:
        member = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    with path.open("r+b") as file:
        file.seek(member.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = np.frombuffer(file.read(4), dtype="<u2")
        at = member.header_offset + 30 + int(name_length) + int(extra_length) + member.file_size // 2
        file.seek(at)
        byte = file.read(1)[0]
        file.seek(at)
        file.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
def test_a_head_stage_after_a_backbone_stage_trains_on_the_trained_backbone(
        tmp_path: Path, hydra_in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A second stage named `head` gets features of the backbone the `all` stage trained: the last epoch's val
    loss is what `transfer eval checkpoint=last` measures on the images (features keyed by the stage's name would
    be the first stage's, of a backbone that no longer exists)."""
    cache = tmp_path / "cache"
    run = _train(tmp_path / "run", HEAD_ALL_HEAD, "trainer.epochs=3", "trainer.cache_features=true",
                 f"trainer.cache_dir={cache}")
    assert len(list(cache.glob("*.pt"))) == 4  # both splits, for each of the two backbones the head saw
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert main(["eval", str(run), "checkpoint=last"]) == 0
    evaluated = json.loads((run / "eval" / "val" / "last" / "metrics.json").read_text())
    assert last["val/loss"] == pytest.approx(evaluated["loss"], abs=1e-4)
    trainable = json.loads((run / "summary.json").read_text())["params_trainable"]
    assert list(trainable) == ["head", "all", "head#2"]  # one count per stage, the first name unchanged
    assert trainable["head"] == trainable["head#2"] < trainable["all"]


def _entries(cache: Path) -> tuple[Path, Path]:
    """The train and val entries of a cache holding one run's features (train has more images: larger)."""
    train_entry, val_entry = sorted(cache.glob("*.pt"), key=lambda path: -path.stat().st_size)
    return train_entry, val_entry


@pytest.mark.slow
def test_a_damaged_or_undigested_feature_cache_entry_is_recomputed(tmp_path: Path, hydra_in_process: None) -> None:
    cache = tmp_path / "cache"
    cached = ["strategy=feature_extract", "trainer.epochs=2", "trainer.cache_features=true",
              f"trainer.cache_dir={cache}"]
    _train(tmp_path / "first", *cached)
    train_entry, val_entry = _entries(cache)
    flip_tensor_byte(train_entry)  # bit rot inside the cached features
    undigested = checkpoint.read(val_entry)
    del undigested[checkpoint.DIGEST]  # as an earlier version wrote it
    torch.save(undigested, val_entry)
    run = _train(tmp_path / "again", *cached)
    log = (run / "train.log").read_text()
    assert f"{train_entry} is damaged (its bytes do not match the digest it was saved with)" in log
    assert f"{val_entry} carries no digest of its bytes" in log
    assert "feature cache hit" not in log
    plain = _train(tmp_path / "plain", "strategy=feature_extract", "trainer.epochs=2", "trainer.cache_features=false")
    assert_same_metrics(run, plain)
    for entry in (train_entry, val_entry):  # rewritten whole, with their digests
        assert checkpoint.DIGEST in checkpoint.read(entry)
        checkpoint.verified(checkpoint.read(entry), entry)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fine-tuning run (every tensor inline in best.pt and last.pt), as `transfer train` leaves it."""
    return trained_in_process(tmp_path_factory.mktemp("trained") / "run",
                              compose_train([*TINY, "strategy=fine_tune", "trainer.epochs=1"]))


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return fresh_copy(trained, tmp_path)


@pytest.mark.slow
def test_an_undamaged_checkpoint_evaluates_in_a_fresh_process(run: Path) -> None:
    """The control, in a process of its own (another hash seed): the digests depend on the bytes alone."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-m", "transfer_cli", "eval", str(run)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_checkpoint_without_its_digest_record_is_refused(run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A file with no digest record is not one `transfer train` wrote whole: nothing proves its bytes."""
    copy = tmp_path / "undigested"
    shutil.copytree(run, copy)
    file = copy / "checkpoints" / "best.pt"
    payload = checkpoint.read(file)
    del payload[checkpoint.DIGEST]
    torch.save(payload, file)
    assert main(["eval", str(copy)]) == 2
    assert "carries no digest record" in capsys.readouterr().err


def _image(folder: Path) -> Path:
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)).save(folder / "a.png")
    return folder


COMMANDS = {
    "eval": ("best", lambda run, tmp: ["eval", str(run)]),
    "predict": ("best", lambda run, tmp: ["predict", str(run), str(_image(tmp / "images"))]),
    "export": ("best", lambda run, tmp: ["export", str(run), "--out", str(tmp / "exported")]),
    "resume": ("last", lambda run, tmp: ["resume", str(run)]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_reader_refuses_a_checkpoint_whose_tensor_bytes_changed(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    which, argv = COMMANDS[command]
    (run / "summary.json").unlink()  # resume: an unfinished run
    file = run / "checkpoints" / f"{which}.pt"
    flip_tensor_byte(file)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert main(argv(run, tmp_path)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == [
        f"transfer: error: {file} is damaged: its contents do not match the digest it was saved with (entry "
        "'model'); restore it from a copy, or retrain"]
    after = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert {path: after.get(path) for path in before} == before  # every file of the run as it was
    assert not (tmp_path / "exported").exists()


def test_the_python_api_refuses_a_damaged_checkpoint(run: Path) -> None:
    flip_tensor_byte(run / "checkpoints" / "best.pt")
    with pytest.raises(TransferError, match=r"best\.pt is damaged: its contents do not match the digest"):
        transfer_cli.load_run(run)
