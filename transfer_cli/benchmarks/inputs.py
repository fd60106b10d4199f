"""What the races against other tools need from outside the repository: the peer's script, a folder of photos
with train/ and val/, and pretrained weights in an offline Hugging Face cache. Each is an option or an environment
variable; where one is missing, the figure that needs it is `skipped: <why>`, never a failure."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


PEER_TIMM_ENV = "TRANSFER_PEER_TIMM"  # timm's train.py
PHOTOS_ENV = "TRANSFER_BENCH_PHOTOS"  # a folder with train/ and val/ class subfolders (hymenoptera)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class BenchInputs:
    peer_timm: str | None = None
    photos: str | None = None
    hf_home: str | None = None  # null: HF_HOME, else huggingface_hub's default

    @classmethod
    def resolve(cls, peer_timm: str | None, photos: str | None, hf_home: str | None) -> BenchInputs:
        """Options first, then the environment."""
        return cls(peer_timm or os.environ.get(PEER_TIMM_ENV) or None, photos or os.environ.get(PHOTOS_ENV) or None,
                   hf_home or os.environ.get("HF_HOME") or None)

    def hf_dir(self) -> Path:
        return Path(self.hf_home).expanduser() if self.hf_home else Path.home() / ".cache" / "huggingface"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with the Hugging Face cache pinned and offline: no run may reach the network."""
        return {**base, "HF_HOME": str(self.hf_dir()), "HF_HUB_OFFLINE": "1"}

    def missing_photos(self) -> str | None:
        """Why the photos cannot be used, or None."""
        if not self.photos:
            return f"no photos: pass --photos DIR (train/ and val/ class folders) or set {PHOTOS_ENV}"
        root = Path(self.photos)
        for split in ("train", "val"):
            if not any(count_images(root / split).values()):
                return f"no images in {root / split} (--photos needs train/ and val/ class folders)"
        return None

    def missing_weights(self, model: str) -> str | None:
        """Why timm `model`'s pretrained weights are not in the offline cache, or None."""
        repo = self.hf_dir() / "hub" / f"models--timm--{model}"
        if not any(repo.glob("snapshots/*/*.safetensors")) and not any(repo.glob("snapshots/*/*.bin")):
            return f"no {model} weights in the Hugging Face cache {self.hf_dir()} (--hf-home DIR or HF_HOME)"
        return None

    def missing_peer(self) -> str | None:
        if not self.peer_timm:
            return f"no peer script: pass --peer-timm PATH (timm's train.py) or set {PEER_TIMM_ENV}"
        if not Path(self.peer_timm).is_file():
            return f"peer script {self.peer_timm} not found"
        return None


def count_images(split: Path) -> dict[str, int]:
    """Images per class subfolder of `split` (ImageFolder's view: one folder a class, image suffixes only)."""
    if not split.is_dir():
        return {}
    return {folder.name: sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
            for folder in sorted(split.iterdir()) if folder.is_dir()}


def warm_file_cache(root: Path) -> None:
    """Read every file under `root` once, so neither side of a race pays cold disk reads the other does not."""
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()
