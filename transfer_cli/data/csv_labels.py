"""Labels in a file: `dataset=csv dataset.csv=labels.csv dataset.root=images/`.

The file has a header row with the columns `path` and `label`, and optionally `split`. Paths are
relative to dataset.root and must stay inside it; classes are the sorted labels. With a split
column, rows whose split is dataset.train_split train and rows whose split is dataset.val_split
score (rows of another usual split name, such as `test`, wait for `transfer eval`); without one,
dataset.val_fraction of each label is held out, as for a folder. Every mistake is one line naming
the file and the row (the header is row 1), before any image is read.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath

from transfer_cli.config.schema import DatasetConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.folder import SPLIT_FOLDERS, VAL_SPELLINGS


COLUMNS = ("path", "label")  # and optionally "split"


@dataclass(frozen=True)
class LabelsFile:
    """What a labels file lists: files (under `root`) with their label index, per split; `val` None: hold out."""

    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]] | None


@dataclass(frozen=True)
class _Row:
    number: int  # as a spreadsheet shows it: the header is row 1
    path: Path
    label: str
    split: str | None


def read_labels(cfg: DatasetConfig) -> LabelsFile:
    """The labels file named by dataset.csv, checked row by row against dataset.root."""
    if cfg.csv is None or cfg.root is None:
        raise TransferError("dataset=csv needs dataset.csv=<labels file with path,label[,split] columns> and "
                            "dataset.root=<folder its paths start from>")
    source, root = Path(cfg.csv).expanduser(), Path(cfg.root).expanduser()
    if not source.is_file():
        raise TransferError(f"dataset.csv={cfg.csv}: no such file; point it at a labels file with a header row "
                            "path,label[,split]")
    if not root.is_dir():
        raise TransferError(f"dataset.root={cfg.root} is not a directory: point it at the folder the paths in "
                            f"{source.name} start from")
    rows = _rows(source, root, cfg)
    split_column = rows[0].split is not None if rows else False
    train_rows = [row for row in rows if not split_column or row.split == cfg.train_split]
    classes = sorted({row.label for row in train_rows})
    for row in rows:
        if row.label not in classes:
            raise TransferError(f"{source} row {row.number}: label {row.label!r} has no {cfg.train_split} image: "
                                f"add {cfg.train_split} rows of it, or drop its rows")
    if len(classes) < 2:
        raise TransferError(f"{source} names {len(classes)} label(s) for training: a classifier needs at least 2")
    index = {name: label for label, name in enumerate(classes)}

    def listed(chosen: list[_Row]) -> list[tuple[Path, int]]:
        return [(row.path, index[row.label]) for row in chosen]

    if split_column:
        val_rows = [row for row in rows if row.split == cfg.val_split]
        if not val_rows:
            raise TransferError(f"{source} has no row whose split is {cfg.val_split} (dataset.val_split): add some, "
                                f"or set dataset.val_split to a split it has")
        return LabelsFile(root, classes, listed(train_rows), listed(val_rows))
    if cfg.val_split not in VAL_SPELLINGS:
        raise TransferError(f"dataset.val_split={cfg.val_split}: {source} has no split column, so the run holds out "
                            f"dataset.val_fraction of each label; add a split column to name a {cfg.val_split} split")
    _check_enough_to_hold_out(rows, source, cfg.val_fraction)
    return LabelsFile(root, classes, listed(train_rows), None)


def _rows(source: Path, root: Path, cfg: DatasetConfig) -> list[_Row]:
    """Every data row, each checked: path inside root and present, listed once, a label, a known split."""
    known = {cfg.train_split, cfg.val_split, *SPLIT_FOLDERS}
    inside = root.resolve()
    try:
        with source.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip().lower() for name in next(reader, [])]
            missing = [name for name in COLUMNS if name not in header]
            if missing:
                raise TransferError(f"{source} row 1: no {' or '.join(missing)} column in the header row (it has: "
                                    f"{', '.join(header) or 'nothing'}): the first row must name the columns "
                                    "path,label and optionally split")
            where = {name: header.index(name) for name in (*COLUMNS, "split") if name in header}
            rows, seen = [], {}
            for number, cells in enumerate(reader, start=2):
                if not any(cell.strip() for cell in cells):
                    continue  # a blank line
                value = {name: cells[at].strip() if at < len(cells) else "" for name, at in where.items()}
                path = _checked_path(value["path"], root, inside, f"{source} row {number}")
                first = seen.setdefault(str(path), number)
                if first != number:
                    raise TransferError(f"{source} row {number}: {value['path']} is listed twice (also row {first}): "
                                        "list each image once")
                if not value["label"]:
                    raise TransferError(f"{source} row {number}: empty label for {value['path']}: give it one, or "
                                        "drop the row")
                split = value.get("split")
                if split is not None and split not in known:
                    raise TransferError(f"{source} row {number}: unknown split {split!r}: use {cfg.train_split} "
                                        f"(dataset.train_split) or {cfg.val_split} (dataset.val_split)")
                rows.append(_Row(number, root / path, value["label"], split))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TransferError(f"cannot read {source} as a CSV file ({error}): save it as UTF-8 CSV") from error
    if not rows:
        raise TransferError(f"{source} lists no images: add rows path,label[,split] below its header")
    return rows


def _checked_path(given: str, root: Path, inside: Path, where: str) -> PurePath:
    """`given` as a normalized path relative to `root`, refused where it leads out of root or names no file."""
    if not given:
        raise TransferError(f"{where}: empty path: give each row the image's path relative to dataset.root")
    relative = PurePath(given)
    if relative.is_absolute() or given.startswith(("/", "\\")) or ".." in relative.parts:
        raise TransferError(f"{where}: path {given} leads outside dataset.root ({root}): give it relative to that "
                            "folder, without '..'")
    relative = PurePath(os.path.normpath(given))
    target = root / relative
    if not target.resolve().is_relative_to(inside):
        raise TransferError(f"{where}: path {given} is a link that leads outside dataset.root ({root}): copy the "
                            "image into that folder")
    if not target.is_file():
        raise TransferError(f"{where}: no file {given} under {root}: fix the path, or drop the row")
    return relative


def _check_enough_to_hold_out(rows: list[_Row], source: Path, val_fraction: float) -> None:
    """Holding out a share of every label needs two images of each: one to train on, one to score."""
    counts = Counter(row.label for row in rows)
    for label, count in sorted(counts.items()):
        if count < 2:
            row = next(row for row in rows if row.label == label)
            raise TransferError(f"{source} row {row.number}: label {label!r} has a single image: holding out "
                                f"dataset.val_fraction={val_fraction:g} of each label needs at least 2; add images, "
                                "or add a split column")
