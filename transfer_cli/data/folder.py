"""Any image folder: `root/train/<class>/` and `root/val/<class>/`, or `root/<class>/` split by seed.

Every image is opened and decoded once when the folder is scanned, so a corrupt or
truncated file is found before training starts, not as a crash halfway through an epoch.
Loading can decode a JPEG at reduced size where the pipeline allows it (`fetch`, decode.py).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer_cli.core.errors import TransferError


log = logging.getLogger(__name__)

# torchvision's image extensions, and GIF: PIL decodes its first frame (palette, transparency and all: to_rgb)
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")

SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# What PIL and its format plugins raise on a corrupt, truncated or oversized file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as a new 8-bit RGB image; alpha is dropped, as PIL's own convert does.

    PIL's convert clips 16-bit values to 255 (mid-grey 32768 would become white), so
    16-bit grey is scaled by >> 8 here; palette images with transparency go through RGBA,
    as PIL asks (it warns on a direct conversion).
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int32).clip(0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class ReducedDecode(Protocol):
    """How small a JPEG may be decoded (decode.DecodePlan)."""

    def request(self, width: int, height: int) -> tuple[int, int] | None: ...

    def finish(self, image: Image.Image, box: tuple[float, float, float, float],
               original: tuple[int, int]) -> Image.Image: ...


def load_rgb(path: Path, plan: ReducedDecode | None = None) -> Image.Image:
    """The image at `path` as RGB; a JPEG at reduced size where `plan` allows it, finished as it says."""
    with Image.open(path) as image:
        request = plan.request(*image.size) if plan is not None and image.format == "JPEG" else None
        original = image.size
        drafted = image.draft(image.mode, request) if request is not None else None
        if drafted is None:  # not a JPEG, no reduction allowed, or one PIL cannot do (a multi-tile file)
            return to_rgb(image)
        return plan.finish(to_rgb(image), drafted[1], original)


def decode_problem(path: Path) -> str | None:
    """Why `path` cannot be loaded, or None; decodes JPEGs at 1/8 scale, which still reads every byte."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))  # a no-op for formats other than JPEG
            to_rgb(image)
    except UnidentifiedImageError:  # its message repeats the path
        return "not an image format PIL can read"
    except DECODE_ERRORS as error:
        message = str(error).strip()
        return message.splitlines()[0] if message else type(error).__name__
    return None


def image_files(folder: Path) -> list[Path]:
    """Image files at any depth under `folder`, sorted (folder_files)."""
    return folder_files(folder).images


class FolderFiles(NamedTuple):
    """The files under a folder: images by their extension, and the rest, each sorted."""

    images: list[Path]
    unsupported: list[Path]


def folder_files(folder: Path) -> FolderFiles:
    """Files at any depth under `folder`, split by extension (IMAGE_EXTENSIONS). Hidden entries (a name starting
    with '.') are left out silently at every depth: `.thumbs/` folders, `.DS_Store`, and the AppleDouble `._x.jpg`
    files macOS writes beside `x.jpg`, which are not images. Symlinks to folders are not followed."""
    images, unsupported = [], []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]  # os.walk does not enter them
        for name in files:
            if not name.startswith("."):
                supported = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                (images if supported else unsupported).append(Path(parent, name))
    return FolderFiles(sorted(path for path in images if path.is_file()),
                       sorted(path for path in unsupported if path.is_file()))


class FileImages(Dataset):
    """Items read from image files here, so a JPEG can be decoded at the reduced size a pipeline allows
    (`load(index, plan)`; folder datasets, `transfer predict`'s and the API's files)."""

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def load(self, index: int, plan: ReducedDecode | None = None) -> tuple[Image.Image, int]:
        raise NotImplementedError


class ImageFolderDataset(FileImages):
    """Images under `root/<class>/`, labelled by `classes`, decoded once up front; loaded as RGB PIL images.

    Unreadable files are skipped with a warning (listed in `skipped`) or, with
    `on_bad_image="error"`, stop the scan with a TransferError naming the file.
    """

    def __init__(self, root: Path, classes: list[str], on_bad_image: str = "skip",
                 listed: Sequence[tuple[Path, int]] | None = None) -> None:
        """`listed`: the (file under `root`, label) pairs to hold, as a labels file gives them, instead of the
        files under `root/<class>/`; either way each class's files in sorted order, classes in label order."""
        self.root = root
        self.classes = classes
        self.on_bad_image = on_bad_image
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[Path] = []
        self.unsupported: list[Path] = []  # files under the class folders left out by their extension
        for label, name in enumerate(classes):
            if listed is None:
                found = folder_files(root / name)
                self.unsupported.extend(found.unsupported)
                files, where = found.images, f"class folder {root / name}"
            else:
                files, where = sorted(path for path, of in listed if of == label), f"class {name!r}"
                if not files:  # a split that lists no image of this class
                    continue
            self.samples.extend((path, label) for path in self._readable(files, where))
        self.targets = [label for _, label in self.samples]

    def _readable(self, files: list[Path], where: str) -> list[Path]:
        readable, skipped = [], []
        for path in files:
            problem = decode_problem(path)
            if problem is None:
                readable.append(path)
            elif self.on_bad_image == "error":
                raise TransferError(f"unreadable image {path} ({problem}): replace or remove it, "
                                    "or set dataset.on_bad_image=skip to skip such files")
            else:
                log.warning("skipping unreadable image %s (%s)", path, problem)
                skipped.append(path)
        self.skipped.extend(skipped)
        if not readable:
            unreadable = f"; {len(skipped)} unreadable skipped: {listed_names(skipped)}" if skipped else ""
            raise TransferError(f"{where} holds no images ({', '.join(IMAGE_EXTENSIONS)}{unreadable}): "
                                "add images or remove it")
        return readable

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, plan: ReducedDecode | None = None) -> tuple[Image.Image, int]:
        """Item `index`, its JPEG decoded at reduced size where `plan` allows it."""
        path, label = self.samples[index]
        return load_rgb(path, plan), label


def fetch(dataset: Dataset, index: int, plan: ReducedDecode | None) -> tuple[Any, int]:
    """Item `index` of `dataset`, decoded as `plan` allows where the images are read from files here
    (FileImages, also inside Subsets); anything else as `dataset[index]` serves it."""
    if plan is not None:
        if type(dataset) is Subset:
            return fetch(dataset.dataset, dataset.indices[index], plan)
        if isinstance(dataset, FileImages):
            return dataset.load(index, plan)
    return dataset[index]


def listed_names(paths: list[Path] | list[str], shown: int = 3) -> str:
    """The first `shown` names of `paths`, and how many more."""
    names = ", ".join(getattr(path, "name", path) for path in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def class_folders(root: Path) -> list[str]:
    """Sorted names of the class subfolders of `root`; at least two are required."""
    if not root.is_dir():
        raise TransferError(f"dataset.root '{root}' is not a directory: point it at a folder of class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TransferError(f"{root} has {len(classes)} class folder(s): a classifier needs at least 2 subfolders, one "
                            "per class")
    return classes


SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")
VAL_SPELLINGS = ("val", "valid", "validation")


@dataclass(frozen=True)
class FolderLayout:
    """Where a folder dataset's class folders are: `val` None means hold out a share of `train`."""

    train: Path
    val: Path | None


def folder_layout(root: Path, train_split: str, val_split: str) -> FolderLayout:
    """Class folders directly under `root`, or split folders (`train/`, `val/` or `valid/` or
    `validation/`, `test/`) holding them; never a classifier over the split names.

    Without a val folder the run holds out a share of `train/`; a `val_split` other than the
    usual spellings (`test`, say) must exist, so a typo never turns into a silent hold-out.
    """
    if not root.is_dir():
        raise TransferError(f"dataset.root '{root}' is not a directory: point it at a folder of class subfolders")
    names = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    splits = names & {*SPLIT_FOLDERS, train_split, val_split}
    if not splits:
        return FolderLayout(root, None)
    if names - splits:
        raise TransferError(f"{root} mixes split folders ({', '.join(sorted(splits))}) with other folders "
                            f"({listed_names(sorted(names - splits))}): put the class folders inside {train_split}/ "
                            f"and {val_split}/, or rename a class folder named like a split")
    if train_split not in names:
        raise TransferError(f"{root} has split folders ({', '.join(sorted(splits))}) but no {train_split}/: "
                            f"add {train_split}/<class>/ folders or set dataset.train_split")
    spellings = VAL_SPELLINGS if val_split in VAL_SPELLINGS else ()
    val = next((name for name in (val_split, *spellings) if name in names), None)
    if val is None and not spellings:
        raise TransferError(f"dataset.val_split={val_split}: {root} has no {val_split}/ folder "
                            f"(it has {', '.join(sorted(splits))})")
    return FolderLayout(root / train_split, root / val if val else None)
