"""Any image folder: `root/train/<class>/` and `root/val/<class>/`, or `root/<class>/` split by seed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer_cli.errors import TransferError


class ImageFolderDataset(Dataset):
    """Images under `root/<class>/`, labelled by `classes`; loaded as RGB PIL images."""

    def __init__(self, root: Path, classes: list[str]) -> None:
        self.root = root
        self.classes = classes
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise TransferError(f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)}): add images or remove it")
            self.samples.extend((path, label) for path in files)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def class_folders(root: Path) -> list[str]:
    """Sorted names of the class subfolders of `root`; at least two are required."""
    if not root.is_dir():
        raise TransferError(f"dataset.root '{root}' is not a directory: point it at a folder of class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TransferError(f"{root} has {len(classes)} class folder(s): a classifier needs at least 2 subfolders, one per class")
    return classes


def has_predefined_split(root: Path, train_split: str, val_split: str) -> bool:
    return (root / train_split).is_dir() and (root / val_split).is_dir()
