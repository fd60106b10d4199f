"""A run directory and the files around it in states nobody plans for, from the user's side (real files, the
CLI): the user's own dot-files beside a run, a checkpoint entry renamed by one byte, formula-like or CR-holding CSV
cells, the user's multirun.yaml, links where eval and export write, numbers past a float, FIFOs, a lock folder or a
file as the run dir, an empty run dir, a folder holding only `checkpoints/`, a non-finite first epoch, and SIGTERM
after the last epoch. Each ends in a working command or in one error line, nothing of the user's changed.

One finished run (class folders with formula-like names, EMA weights) is trained per module, beside three files of
the user's; each test that damages it works on its own copy.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from transfer_cli.cli import main

from conftest import REPO
from helpers import hydra_state_restored, one_error_line, transfer, transfer_env, tree_snapshot


CLASSES = ["=1+2", "@SUM(1)", "-x", "\r=cr"]
USER_FILES = {".draft.tmp": b"my draft\n", ".thesis.docx.tmp": b"PK\x03\x04 my thesis", "notes.txt": b"mine\n"}
TRAIN = ["experiment=smoke", "dataset.select_fraction=0",
         "strategy=fine_tune", "trainer.epochs=1", "trainer.batch_size=16", "trainer.ema_decay=0.9"]
FORMULA_START = ("=", "+", "-", "@")

pytestmark = pytest.mark.usefixtures("hydra_in_process")


# --------------------------------------------------------------------------- helpers


def save_image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def class_names(root: Path) -> list[str]:
    """CLASSES, less the one with a CR where the filesystem refuses that character in a folder name."""
    names = []
    for name in CLASSES:
        try:
            (root / name).mkdir()
        except OSError:
            continue
        (root / name).rmdir()
        names.append(name)
    return names


def write_class_folders(root: Path) -> list[str]:
    """train/ and val/ with a folder per formula-like class name, of random 32 px images."""
    root.mkdir(parents=True)
    names = class_names(root)
    for split, count in (("train", 4), ("val", 2)):
        for index, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                save_image(folder / f"{i}.png", 100 * index + 10 * count + i)
    return names


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished `transfer train` run on class folders named like formulas, trained in a folder that held the
    user's own `.draft.tmp`, `.thesis.docx.tmp` and `notes.txt`."""
    base = tmp_path_factory.mktemp("edge_cases")
    classes = write_class_folders(base / "data")
    run_dir = base / "run"
    run_dir.mkdir()
    for name, data in USER_FILES.items():
        (run_dir / name).write_bytes(data)
    with hydra_state_restored():  # what the hydra_in_process fixture undoes, for the module-scoped run
        code = main(["train", *TRAIN, "dataset=folder", f"dataset.root={base / 'data'}", f"hydra.run.dir={run_dir}"])
    return {"run": run_dir, "code": code, "classes": classes}


@pytest.fixture
def run(trained: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the finished run, without the user's files."""
    assert trained["code"] == 0
    copy = tmp_path / "run"
    shutil.copytree(trained["run"], copy, ignore=lambda folder, names: [n for n in names if n in USER_FILES])
    return copy


@pytest.fixture
def interrupted(run: Path) -> Path:
    """The copy without summary.json: a run `transfer resume` continues."""
    (run / "summary.json").unlink()
    return run


# --------------------------------------------------------------------------- the user's dot-files beside a run


def test_a_fresh_run_leaves_the_users_tmp_files_beside_it_byte_for_byte(trained: dict[str, Any]) -> None:
    assert trained["code"] == 0
    run_dir = trained["run"]
    assert (run_dir / "summary.json").is_file()
    for name, data in USER_FILES.items():
        assert (run_dir / name).read_bytes() == data, name


# --------------------------------------------------------------------------- an entry's name changed by one byte


def rename_entry(path: Path, key: str, new: str) -> None:
    """Rewrite the checkpoint zip with the top-level `key` renamed to `new` (its last byte changed) inside
    data.pkl: every member, in order, under its own name, stored uncompressed."""
    assert len(new) == len(key) and new[:-1] == key[:-1] and new != key
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    pattern = b"X" + struct.pack("<I", len(key)) + key.encode()
    rewritten = []
    for name, data in members:
        if name.endswith("/data.pkl"):
            assert data.count(pattern) == 1, (key, data.count(pattern))
            at = data.index(pattern) + len(pattern) - 1
            data = data[:at] + new[-1].encode() + data[at + 1:]
        rewritten.append((name, data))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in rewritten:
            archive.writestr(name, data)


def test_the_undamaged_copy_evaluates(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the renamed entries below: the same copy, no byte changed."""
    assert main(["eval", str(run)]) == 0, capsys.readouterr().err


RENAMED = [("ema", "emb"), ("progress", "progrest"), ("classes", "classet"), ("sha256", "sha25X")]


@pytest.mark.parametrize(("key", "new"), RENAMED, ids=[key for key, _ in RENAMED])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_checkpoint_entry_renamed_by_one_byte_is_refused_as_damaged(
        interrupted: Path, capsys: pytest.CaptureFixture[str], command: str, key: str, new: str) -> None:
    file = interrupted / "checkpoints" / ("best.pt" if command == "eval" else "last.pt")
    rename_entry(file, key, new)
    capsys.readouterr()
    code = main([command, str(interrupted)])
    line = one_error_line(code, capsys.readouterr().err, file)
    assert "damaged" in line, line


# --------------------------------------------------------------------------- CSV cells a spreadsheet would run


def test_predict_csv_of_formula_like_and_cr_names_reads_back_one_row_per_image(
        trained: dict[str, Any], run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    names = ["=cmd.png", "+a.png", "@z.png", "plain.png"]
    try:
        save_image(images / "a\rb.png", 0)
        names.append("a\rb.png")
    except OSError:  # a filesystem without CRs in names
        pass
    for i, name in enumerate(names):
        save_image(images / name, i + 1)
    save_image(images / "more" / "-y.png", 9)
    monkeypatch.chdir(images)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run), *names, "more", "--out", str(out)]) == 0, capsys.readouterr().err
    with open(out, newline="") as file:
        rows = list(csv.reader(file))
    assert len(rows) == 1 + len(names) + 1, rows
    assert {len(row) for row in rows} == {len(rows[0])}, rows
    assert rows[0][:3] == ["path", "class_1", "probability_1"]
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_START), (cell, row)
    shown = {cell for row in rows[1:] for cell in row[1::2]}
    # a name a spreadsheet would run (a CR or tab first too) gets a leading quote, any other is as it is
    assert shown == {"'" + name if name.startswith((*FORMULA_START, "\r", "\t")) else name
                     for name in trained["classes"]}
    assert "'=cmd.png" in {row[0] for row in rows}


# --------------------------------------------------------------------------- the user's own multirun.yaml


def test_a_sweep_dir_holding_the_users_multirun_yaml_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("mine")
    code = main(["train", "-m", "experiment=smoke", "dataset.select_fraction=0",
                 "strategy=fine_tune", "trainer.epochs=1",
                 f"hydra.sweep.dir={sweep}"])
    one_error_line(code, capsys.readouterr().err, sweep / "multirun.yaml")
    assert tree_snapshot(sweep) == {"multirun.yaml": b"mine"}


# --------------------------------------------------------------------------- links where eval and export write


def test_eval_refuses_an_eval_folder_that_links_to_the_users_folder(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users"
    (users / "val").mkdir(parents=True)
    (users / "val" / "metrics.json").write_text("mine")
    (run / "eval").symlink_to(users, target_is_directory=True)
    code = main(["eval", str(run)])
    one_error_line(code, capsys.readouterr().err, run / "eval")
    assert tree_snapshot(users) == {"val": "dir", "val/metrics.json": b"mine"}


@pytest.mark.parametrize("link", ["export/torchscript", "export"])
def test_export_refuses_an_export_folder_that_links_to_the_users_folder(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], link: str) -> None:
    users = tmp_path / "users"
    (users / "torchscript").mkdir(parents=True)
    (users / "model.json").write_text("mine")
    (users / "torchscript" / "model.json").write_text("mine")
    before = tree_snapshot(users)
    (run / link).parent.mkdir(exist_ok=True)
    (run / link).symlink_to(users, target_is_directory=True)
    code = main(["export", str(run)])
    one_error_line(code, capsys.readouterr().err, run / link)
    assert tree_snapshot(users) == before


# --------------------------------------------------------------------------- numbers past what a float holds


def test_report_shows_a_reported_val_acc_past_a_float_as_unknown_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "huge"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("strategy:\n  name: huge\ntrainer:\n  seed: 0\n")
    (run_dir / "summary.json").write_text('{"status": "finished", "reported_val_acc": 1' + "0" * 400
                                          + ', "final_val_acc": 0.5, "epochs_run": 1}')
    assert main(["report", str(tmp_path / "runs")]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    warnings = [line for line in err.splitlines() if line.startswith("transfer: warning: ")]
    named = [line for line in warnings if str(run_dir / "summary.json") in line and "reported_val_acc" in line]
    assert len(named) == 1 and "unknown" in named[0], err
    row = next(line for line in out.splitlines() if "huge" in line)
    assert "0000000000" not in row and "inf" not in row.lower(), row


def test_resume_refuses_a_val_loss_past_a_float_before_training(
        interrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = interrupted / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[0], count = re.subn(r'"val/loss": [^,}]+', '"val/loss": 1' + "0" * 400, lines[0])
    assert count == 1
    metrics.write_text("\n".join(lines) + "\n")
    before = tree_snapshot(interrupted)
    code = main(["resume", str(interrupted)])
    one_error_line(code, capsys.readouterr().err, metrics)
    assert tree_snapshot(interrupted) == before  # the checkpoints above all: no epoch ran


# --------------------------------------------------------------------------- NaN in summary.json, then export


@pytest.mark.slow
def test_export_writes_null_for_a_nan_reported_val_acc(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run / "summary.json"
    text, count = re.subn(r'"reported_val_acc": [^,}\n]+', '"reported_val_acc": NaN', summary.read_text())
    assert count == 1
    summary.write_text(text)
    assert main(["export", str(run)]) == 0, capsys.readouterr().err
    model_json = run / "export" / "torchscript" / "model.json"
    assert json.loads(model_json.read_text())["metrics"]["reported_val_acc"] is None
    assert "NaN" not in model_json.read_text()


# --------------------------------------------------------------------------- FIFOs in place of run files


@pytest.mark.parametrize(("command", "name"), [
    ("resume", "metrics.jsonl"), ("resume", "summary.json"),
    pytest.param("report", "summary.json", marks=pytest.mark.slow),  # report imports matplotlib: over a second
])
def test_a_fifo_in_place_of_a_run_file_is_one_line_not_a_hang(interrupted: Path, command: str, name: str) -> None:
    (interrupted / name).unlink(missing_ok=True)
    os.mkfifo(interrupted / name)
    started = time.monotonic()
    done = transfer(command, str(interrupted), timeout=60)  # a hang fails the test
    one_error_line(done.returncode, done.stderr, interrupted / name)
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- a lock folder, a file as the run dir


def test_resume_refuses_a_lock_that_is_a_folder(interrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = interrupted / ".lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    before = tree_snapshot(interrupted)
    one_error_line(main(["resume", str(interrupted)]), capsys.readouterr().err, lock)
    assert tree_snapshot(interrupted) == before


def test_train_refuses_a_file_as_its_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    one_error_line(main(["train", "experiment=smoke", "dataset.select_fraction=0",
                         f"hydra.run.dir={file}"]), capsys.readouterr().err, file)
    assert tree_snapshot(tmp_path) == {"notes.txt": b"mine"}


# --------------------------------------------------------------------------- an empty run dir


@pytest.mark.parametrize("argv", [["hydra.run.dir="], ["-m", "trainer.seed=1,2", "hydra.sweep.dir="]],
                         ids=["run", "sweep"])
def test_an_empty_run_dir_is_refused_and_the_current_folder_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code = main(["train", "experiment=smoke", "dataset.select_fraction=0", *argv])
    line = one_error_line(code, capsys.readouterr().err, argv[-1].rstrip("="))
    assert "empty" in line, line
    assert tree_snapshot(tmp_path) == {"notes.txt": b"mine"}


# --------------------------------------------------------------------------- a folder holding only checkpoints/


def test_a_folder_holding_only_the_users_checkpoints_is_not_called_a_run_to_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "model.pt").write_bytes(b"my own weights")
    before = tree_snapshot(folder)
    code = main(["train", "experiment=smoke", "dataset.select_fraction=0", f"hydra.run.dir={folder}"])
    line = one_error_line(code, capsys.readouterr().err, folder)
    assert "transfer resume" not in line and "would write" in line, line
    assert tree_snapshot(folder) == before


# --------------------------------------------------------------------------- non-finite in epoch 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fine_tune", "feature_extract"])  # the train loss; the val loss
def test_a_run_non_finite_in_epoch_1_does_not_claim_a_last_pt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str) -> None:
    run_dir = tmp_path / "run"
    code = main(["train", "experiment=smoke", "dataset.select_fraction=0",
                 f"strategy={strategy}", "trainer.epochs=1", "optimizer.lr_scale=1e30",
                 "dataset.train_size=32", "dataset.val_size=16", "trainer.batch_size=16", f"hydra.run.dir={run_dir}"])
    line = one_error_line(code, capsys.readouterr().err)
    assert "non-finite" in line, line  # it really went non-finite
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    stop_reason = json.loads((run_dir / "summary.json").read_text())["stop_reason"]
    for text in (line, stop_reason):
        assert "last.pt" not in text and "no checkpoint was saved" in text, text


# --------------------------------------------------------------------------- SIGTERM after the last epoch


def last_epoch_logged(metrics: Path, epoch: int) -> bool:
    if not metrics.is_file():
        return False
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return any(json.loads(line).get("epoch") == epoch for line in lines)
    except json.JSONDecodeError:  # a line being written
        return False


@pytest.mark.slow
def test_sigterm_just_after_the_last_epoch_ends_in_one_line_and_resumes_to_finished(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "transfer_cli", "train", "experiment=smoke", "dataset.select_fraction=0",
         "strategy=feature_extract",
         "trainer.epochs=2", "dataset.train_size=32", "dataset.val_size=16", "trainer.batch_size=16",
         "eval_splits=[val]", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=transfer_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not last_epoch_logged(run_dir / "metrics.jsonl", 2):
            assert process.poll() is None, f"training ended (rc {process.returncode}) before epoch 2's line"
            assert time.monotonic() < deadline, "epoch 2's metrics line never appeared"
            time.sleep(0.005)
        # then into the part after training: eval_splits has scored best.pt (summary.json and curves.png next)
        while not (run_dir / "eval" / "val").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)  # nothing where the process has already exited
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (143, 0), err
    assert "Traceback" not in err, err
    if process.returncode == 143:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("transfer: terminated by SIGTERM"), err
        assert f"transfer resume {run_dir}" in lines[0], err
    resumed = transfer("resume", str(run_dir), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
