"""The quick-mode exercises' data and weights, fetched once when no local copy is given.

`make exerciseN QUICK=1` without ASSETS (or TRANSFER_ASSETS) runs `transfer exercise assets`
first: it downloads the hymenoptera photos and EuroSAT RGB, keeps exactly the files the shipped
manifests name (lesson/manifests/), each checked against its sha256, and lays them out as an
assets folder, `<data cache>/quick/data/{hymenoptera,eurosat5}`; the timm weights go to the
normal Hugging Face cache. A set is downloaded to a temp name, verified and only then renamed
into place, so the cache holds a whole verified set or none; later calls verify it and reuse it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transfer_cli.config.schema import BackboneConfig
from transfer_cli.core.errors import TransferError
from transfer_cli.data.datasets import default_cache_dir
from transfer_cli.lesson.manifest import MANIFESTS, Entry, mismatch, read_manifest
from transfer_cli.models.backbones import build_raw_backbone


QUICK_WEIGHTS = "tf_efficientnet_lite0.in1k"  # conf/quick's backbone
WHAT_TO_SET = ("with no network, set ASSETS=DIR (make) or TRANSFER_ASSETS=DIR to a local copy of the quick "
               "assets (DIR/data/hymenoptera, DIR/data/eurosat5, DIR/hf-home)")


@dataclass(frozen=True)
class QuickSet:
    """One data set of the quick exercises: where it comes from and what it must hold."""

    name: str  # its folder: <root>/data/<name>
    url: str
    manifest: Path
    archive_digest: tuple[str, str] | None = None  # (hashlib algorithm, hex digest) of the downloaded archive


QUICK_SETS = (
    # the PyTorch transfer-learning tutorial's zip; no published digest: every file is checked instead
    QuickSet("hymenoptera", "https://download.pytorch.org/tutorial/hymenoptera_data.zip",
             MANIFESTS / "hymenoptera.tsv"),
    # the archive torchvision.datasets.EuroSAT downloads, with the md5 torchvision checks it against
    QuickSet("eurosat5", "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
             "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", MANIFESTS / "eurosat5.tsv",
             ("md5", "c8fa014336c82ac7804f0398fcb19387")),
)
Fetcher = Callable[[str, Path], None]


def quick_assets_root() -> Path:
    """Where fetched quick assets live: `quick/` in the data cache (TRANSFER_DATA, ~/.cache/transfer/data)."""
    return default_cache_dir() / "quick"


def download(url: str, dest: Path) -> None:
    """`url` into the file `dest`; a failed or cut-off transfer is one TransferError naming the URL."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise TransferError(f"could not download {url} ({str(reason).splitlines()[0][:160]}): {WHAT_TO_SET}") from None


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: Path, entries: list[Entry], folder: Path, url: str) -> None:
    """The manifest's files, and only those, from `archive` into `folder`, each checked against its sha256."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            for entry in entries:
                try:
                    data = zipped.read(entry.member)
                except KeyError:
                    raise TransferError(f"{url} holds no {entry.member}: it is not the archive the manifest "
                                        "describes; nothing was kept") from None
                if hashlib.sha256(data).hexdigest() != entry.sha256:
                    raise TransferError(f"{url}: {entry.member} does not match its sha256 in the manifest; "
                                        "refused, nothing was kept")
                target = folder / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise TransferError(f"{url} is not a readable zip archive ({exc}); refused, nothing was kept") from None


def ensure_set(quick_set: QuickSet, root: Path, fetch: Fetcher = download) -> Path:
    """`root/data/<name>` holding exactly `quick_set`'s manifest: verified if there, else fetched."""
    entries = read_manifest(quick_set.manifest)
    target = root / "data" / quick_set.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{quick_set.name}.", dir=target.parent) as temp:
            archive, staging = Path(temp) / "archive", Path(temp) / quick_set.name
            fetch(quick_set.url, archive)
            if quick_set.archive_digest:
                algorithm, expected = quick_set.archive_digest
                if _digest(archive, algorithm) != expected:
                    raise TransferError(f"{quick_set.url} does not match its {algorithm} {expected}: refused, "
                                        "nothing was kept")
            _extract(archive, entries, staging, quick_set.url)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():  # another process may have put a whole set there meanwhile
                    raise
        print(f"fetched {quick_set.url}: {len(entries)} files verified into {target}", file=sys.stderr)
    problem = mismatch(target, entries)
    if problem:
        raise TransferError(f"{target} is not the {quick_set.name} set of its manifest ({problem}): "
                            "delete the folder to fetch it again")
    return target


def fetch_weights(name: str = QUICK_WEIGHTS) -> None:
    """The quick exercises' timm weights into the Hugging Face cache (a no-op when already there)."""
    try:
        build_raw_backbone(BackboneConfig(source="timm", name=name), pretrained=True)
    except TransferError as exc:
        cause = exc.__cause__ or exc
        raise TransferError(f"could not fetch the {name} weights through the Hugging Face hub "
                            f"({str(cause).splitlines()[0][:160]}): {WHAT_TO_SET}") from None


def ensure_quick_assets(root: Path | None = None, sets: tuple[QuickSet, ...] = QUICK_SETS,
                        fetch: Fetcher = download, weights: str | None = QUICK_WEIGHTS) -> Path:
    """An assets folder for the quick exercises (data/<set> for every set), fetched where missing; returns it."""
    root = root or quick_assets_root()
    for quick_set in sets:
        ensure_set(quick_set, root, fetch)
    if weights:
        fetch_weights(weights)
    return root
