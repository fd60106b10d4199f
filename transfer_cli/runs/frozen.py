"""The part of a network no optimizer touches, stored once per run: epoch checkpoints hold only what changed.

A head-only stage of ViT-B/16 would otherwise rewrite its whole untouched backbone (86M parameters) into last.pt
(and best.pt) every epoch to keep the few its head trains. The first checkpoint of a run writes
`checkpoints/frozen-<digest>.pt`: every parameter without requires_grad and every buffer of a module without
trainable parameters. Each checkpoint then stores a tensor inline unless it is bit-equal to the stored one, and
names the file and its sha256 digest; loading recomputes the digest, so a changed, torn or foreign frozen file is
refused, never merged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import atomic_file


FROZEN = "frozen"  # the checkpoint key naming the frozen file, its digest and the keys it supplies
PATTERN = "frozen-*.pt"
SECTIONS = {"model": "", "ema": "module."}  # checkpoint sections that may reference it, and their key prefix


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal iff every tensor is bit-equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return digest.hexdigest()


def untrained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the state-dict entries training leaves alone: parameters without requires_grad, and the
    buffers of modules that hold no trainable parameter (a frozen group runs in eval mode)."""
    names = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    for prefix, module in model.named_modules():
        if not any(parameter.requires_grad for parameter in module.parameters(recurse=False)):
            names.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False))
    state = model.state_dict()
    return {name: state[name].detach().to("cpu", copy=True) for name in state if name in names}


class FrozenStore:
    """One run's frozen file: written at the first checkpoint (or adopted from the one resumed), then the
    reference every later checkpoint's equal tensors point to."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None
        self.digest = ""

    def adopt(self, state: dict[str, Any]) -> None:
        """Keep referencing the frozen file of the checkpoint a resume loaded (see `resolve`)."""
        reference = state.get(FROZEN)
        if isinstance(reference, dict) and "tensors" in reference:
            self.tensors, self.digest = reference["tensors"], reference["digest"]

    def shrink(self, payload: dict[str, Any], model: nn.Module, folder: Path) -> dict[str, Any]:
        """`payload` with every model/EMA tensor equal to the frozen file's replaced by a reference to it."""
        if self.tensors is None:
            self._write(untrained_tensors(model), folder)
        if not self.tensors:
            return payload
        shrunk, referenced = dict(payload), {}
        for section, prefix in SECTIONS.items():
            if isinstance(payload.get(section), dict):
                shrunk[section], referenced[section] = self._split(payload[section], prefix)
        shrunk[FROZEN] = {"file": file_name(self.digest), "digest": self.digest, **referenced}
        return shrunk

    def _split(self, state: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
        inline, referenced = {}, []
        for key, value in state.items():
            stored = self.tensors.get(key[len(prefix):]) if key.startswith(prefix) else None
            if stored is not None and self._unchanged(value, stored):
                referenced.append(key)
            else:
                inline[key] = value
        return inline, referenced

    @staticmethod
    def _unchanged(value: Any, stored: torch.Tensor) -> bool:
        """Bit-equal to the stored tensor, compared every time: version counters cannot vouch for it (fused
        optimizers write parameters in place without bumping them)."""
        if not isinstance(value, torch.Tensor) or value.dtype != stored.dtype or value.shape != stored.shape:
            return False
        return torch.equal(value.detach().cpu(), stored)

    def _write(self, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        self.tensors, self.digest = tensors, tensors_digest(tensors) if tensors else ""
        if not tensors:
            return
        path = folder / file_name(self.digest)
        if path.is_file():  # written by this run before a resume: content-addressed, but checked before reuse
            try:
                _read_frozen(path, self.digest)
                return
            except TransferError:
                pass
        with atomic_file(path, "wb") as file:
            torch.save({"digest": self.digest, "tensors": tensors}, file)

    def remove_unreferenced(self, folder: Path, checkpoints: tuple[str, ...]) -> None:
        """Delete frozen files that neither this store nor any of `checkpoints` (names in `folder`) references:
        left by a resume that could not adopt the old one. Runs only where more than one is present."""
        paths = list(folder.glob(PATTERN))
        if len(paths) < 2:
            return
        used = {file_name(self.digest)} if self.digest else set()
        for name in checkpoints:
            if (folder / name).is_file():
                try:
                    reference = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True).get(FROZEN)
                except Exception:  # noqa: BLE001 - unreadable: it may still need any of them; delete nothing
                    return
                used.add(file_name(reference["digest"]) if reference else "")
        for path in paths:
            if path.name not in used:
                path.unlink(missing_ok=True)


def file_name(digest: str) -> str:
    return f"frozen-{digest[:16]}.pt"


def resolve(payload: Any, path: Path) -> Any:
    """A checkpoint read from `path` made whole: the tensors it references merged back from its frozen file
    (kept, verified, under payload['frozen']['tensors'] for a resume to adopt). Other payloads unchanged."""
    reference = payload.get(FROZEN) if isinstance(payload, dict) else None
    if reference is None:
        return payload
    if not isinstance(reference, dict) or not isinstance(reference.get("file"), str) or "digest" not in reference:
        raise TransferError(f"{path} has a damaged reference to its frozen tensors: the checkpoint cannot be used")
    tensors = _read_frozen(path.parent / Path(reference["file"]).name, reference["digest"], needed_by=path)
    whole = dict(payload)
    for section, prefix in SECTIONS.items():
        keys = reference.get(section) or []
        if keys:
            whole[section] = {**{key: tensors[key[len(prefix):]] for key in keys}, **payload[section]}
    whole[FROZEN] = {**reference, "tensors": tensors}
    return whole


def _read_frozen(path: Path, digest: str, needed_by: Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a frozen file whose content hashes to `digest`, or one line saying why not."""
    user = f", which {needed_by.name} needs for its frozen tensors," if needed_by else ""
    if not path.is_file():
        raise TransferError(f"{path}{user} is missing: restore it from a copy of the run directory, or retrain")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        tensors = stored["tensors"]
        actual = tensors_digest(tensors)
    except Exception as error:  # noqa: BLE001 - torn, foreign or tampered: the same refusal
        raise TransferError(f"cannot read {path}{user} ({type(error).__name__}): restore it from a copy of the "
                            "run directory, or retrain") from error
    if actual != digest:
        raise TransferError(f"{path}{user} does not hold the tensors the checkpoint recorded (sha256 differs): it "
                            "was changed or belongs to another run; restore it, or retrain")
    return tensors
