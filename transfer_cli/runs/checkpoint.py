"""Checkpoints that survive a crash mid-write and load without unpickling code."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer_cli.core.files import atomic_file
from transfer_cli.runs.frozen import resolve


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
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash or a full disk leaves the previous file intact, never a truncated one.
    """
    with atomic_file(path, "wb") as file:
        torch.save(payload, file)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (tensors and plain containers only), made whole again from
    the run's frozen file where it references one (runs/frozen.py)."""
    return resolve(torch.load(path, map_location="cpu", weights_only=True), Path(path))


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
