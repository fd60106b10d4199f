"""Checkpoints that survive a crash mid-write, load without unpickling code, and prove their bytes.

Every file `save_atomic` writes carries a sha256 digest of each top-level entry (its tensors by path, dtype,
shape and bytes, and a canonical text of its other values); `load` recomputes them before anything uses the
payload, so bit rot or a torn write inside the tensor data, a value or an entry's name is refused, never
served; a file without the digest record is not one `transfer train` wrote whole, and is refused too.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import atomic_file
from transfer_cli.runs.frozen import resolve, tensors_digest


DIGEST = "sha256"  # the payload key holding the digest of every other top-level entry (`_record`)


class Damaged(TransferError):
    """A file whose entries no longer hash to the digests saved with them."""


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain values (weights_only-safe)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write `payload` and its entries' digests (under DIGEST) to a temp file in the same folder, fsync, then
    rename over `path`.

    A crash or a full disk leaves the previous file intact, never a truncated one; `load` refuses one whose
    bytes changed later.
    """
    with atomic_file(path, "wb") as file:
        torch.save({**payload, DIGEST: _record(payload)}, file)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (tensors and plain containers only), its digests checked,
    made whole again from the run's frozen file where it references one (runs/frozen.py)."""
    return resolve(verified(read(path), Path(path)), Path(path))


def read(path: Path) -> Any:
    """A file as stored: not yet verified, nor merged with a frozen file (cheap checks may come first)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def verified(payload: Any, path: Path) -> Any:
    """`payload` without its digests, once its entries are the ones saved and each hashes to its digest; else one
    line saying the file is damaged (a changed byte in a tensor, a value or an entry's name, or no digest record
    at all: the file is then not one this tool wrote whole)."""
    record = payload.get(DIGEST) if isinstance(payload, dict) else None
    if record is None:
        raise Damaged(f"{path} is damaged or not written by `transfer train`: it carries no digest record of its "
                      "contents; restore it from a copy, or retrain")
    body = {key: value for key, value in payload.items() if key != DIGEST}
    saved = _parsed(record)
    unrecorded = sorted(map(repr, (body.keys() - saved.keys()) | (saved.keys() - body.keys())))
    if unrecorded:
        raise Damaged(f"{path} is damaged: its entries are not the ones it was saved with ({', '.join(unrecorded)} "
                      "missing or renamed); restore it from a copy, or retrain")
    changed = next((key for key, value in body.items() if saved[key] != entry_digest(value)), None)
    if changed is not None:
        raise Damaged(f"{path} is damaged: its contents do not match the digest it was saved with (entry "
                      f"{changed!r}); restore it from a copy, or retrain")
    return body


def _record(payload: dict[str, Any]) -> str:
    """The digests as one text, `<entry name>\t<sha256>` a line: the names are spelled there a second time (in a
    dict of digests pickle would store each name once, shared with the payload, and a changed byte in it would
    rename the entry and its digest alike)."""
    return "".join(f"{key}\t{entry_digest(value)}\n" for key, value in payload.items())


def _parsed(record: Any) -> dict[str, str]:
    """`_record`'s text back as {entry name: digest} (empty where it is no such text: every entry is then unproven)."""
    if not isinstance(record, str):
        return {}
    return dict(line.rsplit("\t", 1) for line in record.splitlines() if "\t" in line)


def entry_digest(value: Any) -> str:
    """sha256 over one payload entry: its tensors by path (frozen.tensors_digest), then the canonical text of the
    structure around them, so a changed number, name or nesting changes it as a changed tensor byte does."""
    tensors: dict[str, torch.Tensor] = {}
    text = _canonical(value, "", tensors)
    return hashlib.sha256(f"{tensors_digest(tensors)}|{text}".encode()).hexdigest()


def _canonical(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> str:
    """`value` as text with each tensor replaced by a marker (and kept in `tensors` under its path); dict keys
    in sorted order, so the text does not depend on insertion order."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return "T"
    if isinstance(value, dict):
        keys = sorted(value, key=repr)
        return "{" + ",".join(f"{key!r}:{_canonical(value[key], f'{path}[{key!r}]', tensors)}" for key in keys) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(item, f"{path}[{index}]", tensors) for index, item in enumerate(value)) + "]"
    return repr(value)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every RNG back where `rng_state` found it."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def misfit(own: dict[str, Any], saved: dict[str, Any]) -> str:
    """What keeps `saved` from loading strictly into a model whose state dict is `own` ('' when it fits)."""
    resized = [key for key in own.keys() & saved.keys() if tuple(own[key].shape) != tuple(saved[key].shape)]
    missing = sorted(own.keys() - saved.keys())
    unexpected = sorted(saved.keys() - own.keys())
    problems = []
    if resized:
        key = sorted(resized)[0]
        problems.append(f"{len(resized)} tensor(s) differ in shape (e.g. {key}: checkpoint "
                        f"{list(saved[key].shape)}, model {list(own[key].shape)})")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
    return ", ".join(problems)
