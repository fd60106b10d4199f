"""The quick exercises' assets from a fresh clone: fetched once, every file proven against the shipped
manifests, nothing half-written on a bad or cut-off download, one line when offline; and the
manifests themselves are the sets the docs measured (the eurosat5 selection rule recomputed, the
local copies compared where TRANSFER_TEST_ASSETS is set)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import tomllib

from transfer_cli.cli import main
from transfer_cli.core.errors import TransferError
from transfer_cli.lesson.manifest import MANIFESTS, MEMBER_OF, build_manifest, format_manifest, read_manifest
from transfer_cli.lesson.quick_assets import QUICK_SETS, QuickSet, download, ensure_quick_assets

from conftest import REPO
from helpers import one_error_line


FILES = {"train/ants/a 1.jpg": b"ant one", "train/bees/b.jpg": b"bee" * 50, "val/ants/F(2).jpg": b"\x00\xff ant"}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_of(files: dict[str, bytes], path: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in {**{f"tiny_data/{k}": v for k, v in files.items()}, **(extra or {})}.items():
            zipped.writestr(name, data)
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> QuickSet:
    """A three-file set: its manifest written from a folder, its zip served by a file:// URL (with stray
    members the manifest does not name), the zip's sha256 pinned."""
    source = tmp_path / "source"
    for name, data in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    manifest = tmp_path / "tiny.tsv"
    manifest.write_text(format_manifest(build_manifest(source, lambda path: f"tiny_data/{path}")))
    archive = zip_of(FILES, tmp_path / "tiny.zip", {"__MACOSX/._b.jpg": b"junk", "tiny_data/val/extra.jpg": b"x"})
    return QuickSet("tiny", archive.as_uri(), manifest, ("sha256", hashlib.sha256(archive.read_bytes()).hexdigest()))


def served(quick_set: QuickSet) -> Path:
    return Path(urllib.request.url2pathname(quick_set.url.removeprefix("file://")))


def untouched(root: Path) -> None:
    """Nothing in the cache: no set, no temp folder, no stray file."""
    data = root / "data"
    assert not data.exists() or list(data.iterdir()) == [], list(data.iterdir())


def test_fetch_keeps_exactly_the_manifest_files_and_reuses_them(tiny: QuickSet, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    assert ensure_quick_assets(root, (tiny,), weights=None) == root
    assert tree(root / "data" / "tiny") == FILES  # the stray zip members are not there
    assert [p.name for p in (root / "data").iterdir()] == ["tiny"]  # no temp folder left beside it

    def no_network(url: str, dest: Path) -> None:
        raise AssertionError(f"fetched {url} again")

    served(tiny).unlink()  # the second call has nothing to download from
    ensure_quick_assets(root, (tiny,), no_network, weights=None)
    assert tree(root / "data" / "tiny") == FILES


def test_a_corrupted_byte_in_the_archive_is_refused(tiny: QuickSet, tmp_path: Path) -> None:
    data = bytearray(served(tiny).read_bytes())
    data[len(data) // 3] ^= 0x01
    served(tiny).write_bytes(bytes(data))
    root = tmp_path / "cache"
    with pytest.raises(TransferError, match=r"tiny\.zip does not match its sha256 [0-9a-f]{64}: refused"):
        ensure_quick_assets(root, (tiny,), weights=None)
    untouched(root)


def test_a_changed_file_is_refused_even_without_an_archive_digest(tiny: QuickSet, tmp_path: Path) -> None:
    """The per-file digests alone catch a relabelled or altered image (a zip that is valid, just not the set)."""
    ant, bee = "train/ants/a 1.jpg", "train/bees/b.jpg"
    swapped = {**FILES, ant: FILES[bee], bee: FILES[ant]}
    unpinned = QuickSet("tiny", zip_of(swapped, tmp_path / "swapped.zip").as_uri(), tiny.manifest)
    root = tmp_path / "cache"
    with pytest.raises(TransferError, match=r"a 1\.jpg does not match its sha256"):
        ensure_quick_assets(root, (unpinned,), weights=None)
    untouched(root)
    missing = QuickSet("tiny", zip_of(dict(list(FILES.items())[:2]), tmp_path / "short.zip").as_uri(), tiny.manifest)
    with pytest.raises(TransferError, match=r"holds no tiny_data/val/ants/F\(2\)\.jpg"):
        ensure_quick_assets(root, (missing,), weights=None)
    untouched(root)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, urllib.error.URLError("connection reset")])
def test_an_interrupted_download_leaves_no_partial_folder(tiny: QuickSet, tmp_path: Path, failure) -> None:
    def cut_off(url: str, dest: Path) -> None:
        dest.write_bytes(served(tiny).read_bytes()[:100])
        if isinstance(failure, Exception):
            raise TransferError(f"could not download {url} ({failure})")
        raise failure

    root = tmp_path / "cache"
    with pytest.raises((KeyboardInterrupt, TransferError)):
        ensure_quick_assets(root, (tiny,), cut_off, weights=None)
    untouched(root)
    ensure_quick_assets(root, (tiny,), weights=None)  # the next try starts clean and succeeds
    assert tree(root / "data" / "tiny") == FILES


def test_a_truncated_download_is_refused(tiny: QuickSet, tmp_path: Path) -> None:
    served(tiny).write_bytes(served(tiny).read_bytes()[:-40])
    root = tmp_path / "cache"
    with pytest.raises(TransferError, match="does not match"):
        ensure_quick_assets(root, (tiny,), download, weights=None)
    untouched(root)


def test_a_cached_set_that_changed_is_refused_not_reused(tiny: QuickSet, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    ensure_quick_assets(root, (tiny,), weights=None)
    (root / "data" / "tiny" / "val" / "ants" / "F(2).jpg").write_bytes(b"other")
    with pytest.raises(TransferError, match=r"F\(2\)\.jpg has sha256 .*delete the folder"):
        ensure_quick_assets(root, (tiny,), weights=None)
    (root / "data" / "tiny" / "val" / "ants" / "F(2).jpg").write_bytes(FILES["val/ants/F(2).jpg"])
    (root / "data" / "tiny" / "val" / "bees").mkdir()
    (root / "data" / "tiny" / "val" / "bees" / "new.jpg").write_bytes(b"bee")
    with pytest.raises(TransferError, match=r"val/bees/new\.jpg is not in the manifest"):
        ensure_quick_assets(root, (tiny,), weights=None)


def test_offline_the_command_fails_once_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("TRANSFER_DATA", str(tmp_path / "data-cache"))
    code = main(["exercise", "assets"])
    captured = capsys.readouterr()
    one_error_line(code, captured.err, "ASSETS=", "TRANSFER_ASSETS=", QUICK_SETS[0].url, out=captured.out)
    assert captured.out == ""
    untouched(tmp_path / "data-cache" / "quick")


def make_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"ASSETS", "TRANSFER_ASSETS", "MAKEFLAGS"}}
    return {**env, **variables}


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
@pytest.mark.slow
def test_make_quick_without_assets_fails_once_before_any_run(tmp_path: Path) -> None:
    """A fresh clone with no network: one line naming what to set, no run started, a non-zero exit."""
    env = make_env(TRANSFER_DATA=str(tmp_path / "cache"), https_proxy="http://127.0.0.1:9",
                   http_proxy="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    result = subprocess.run(["make", "-s", "exercise1", "QUICK=1", f"EXERCISES={tmp_path / 'ex'}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("transfer: error:")]
    assert len(errors) == 1 and "ASSETS=DIR" in errors[0] and "hymenoptera_data.zip" in errors[0], result.stderr
    assert "Launching" not in result.stdout + result.stderr and not (tmp_path / "ex" / "ex1" / "runs").exists()


@needs_make
@pytest.mark.parametrize(("variables", "env", "fetches", "assets"), [
    ([], {}, True, None),
    (["ASSETS=/local/assets"], {}, False, "/local/assets"),
    ([], {"TRANSFER_ASSETS": "/env/assets"}, False, "/env/assets"),
], ids=["fetch", "ASSETS", "TRANSFER_ASSETS"])
def test_make_quick_uses_local_assets_or_fetches(variables: list[str], env: dict[str, str], fetches: bool,
                                                 assets: str | None) -> None:
    result = subprocess.run(["make", "-n", "-s", "exercise4", "QUICK=1", "EXERCISES=/tmp/ex", *variables],
                            cwd=REPO, env=make_env(**env), capture_output=True, text=True, check=True)
    script = result.stdout
    assert ("transfer exercise assets" in script) == fetches
    if assets:
        assert f"assets={assets};" in script and "HF_HOME=$assets/hf-home HF_HUB_OFFLINE=1" in script
    else:  # weights from the normal Hugging Face cache, which the fetch filled
        assert "HF_HOME" not in script and "HF_HUB_OFFLINE=1 TRANSFER_ASSETS=$assets" in script
    assert "dataset.root=$assets/data/hymenoptera" in script and "dataset.root=$assets/data/eurosat5" in script


# --------------------------------------------------------------------------- the shipped manifests

EUROSAT_CLASS_SIZES = {"AnnualCrop": 3000, "Forest": 3000, "Highway": 2500, "Residential": 3000, "SeaLake": 3000}


def test_eurosat5_manifest_is_the_documented_selection() -> None:
    """Recomputes the selection rule from EuroSAT's file naming: per class, the first 60 names in byte order,
    42 to train and 18 to val; and the digest over all 300 files that the set's provenance states."""
    entries = read_manifest(MANIFESTS / "eurosat5.tsv")
    expected = []
    for name, size in EUROSAT_CLASS_SIZES.items():
        first = sorted(f"{name}_{n}.jpg" for n in range(1, size + 1))[:60]
        expected += [(f"{split}/{name}/{file}", f"2750/{name}/{file}")
                     for split, files in (("train", first[:42]), ("val", first[42:])) for file in files]
    assert sorted((e.path, e.member) for e in entries) == sorted(expected)
    listing = "".join(f"{e.sha256}  {e.path}\n" for e in sorted(entries, key=lambda e: e.path))
    assert hashlib.sha256(listing.encode()).hexdigest() == \
        "46cd7ed7a7d682ac96ee0d4c27072251bf3427bee1799a29d389e05d68714a5f"


def test_hymenoptera_manifest_holds_the_tutorial_split() -> None:
    entries = read_manifest(MANIFESTS / "hymenoptera.tsv")
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.path.rsplit("/", 1)[0]] = counts.get(entry.path.rsplit("/", 1)[0], 0) + 1
        assert entry.member == f"hymenoptera_data/{entry.path}"
    assert counts == {"train/ants": 124, "train/bees": 121, "val/ants": 70, "val/bees": 83}
    assert len({e.sha256 for e in entries}) == len(entries)


def test_every_quick_set_has_its_manifest() -> None:
    assert {s.name for s in QUICK_SETS} == set(MEMBER_OF) == {p.stem for p in MANIFESTS.glob("*.tsv")}
    assert all(s.manifest.is_file() for s in QUICK_SETS)


def test_manifests_match_the_local_assets(assets: Path) -> None:
    """The shipped manifests are exactly the local copies the docs' tables were measured on."""
    for name, member_of in MEMBER_OF.items():
        shipped = (MANIFESTS / f"{name}.tsv").read_text()
        assert format_manifest(build_manifest(assets / "data" / name, member_of)) == shipped, name


def test_the_package_data_ships_every_manifest() -> None:
    """A non-editable install must carry the manifests, or a fresh install could verify nothing."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p.relative_to(MANIFESTS.parent).as_posix() for p in MANIFESTS.iterdir()]
    assert shipped and all(any(fnmatch.fnmatch(path, pattern) for pattern in patterns["transfer_cli.lesson"])
                           for path in shipped)


def test_weights_that_cannot_be_fetched_fail_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and an empty Hugging Face cache: the weights step says what to set, like the data step."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(TransferError) as caught:
        ensure_quick_assets(tmp_path / "cache", (), weights="tf_efficientnet_lite0.in1k")
    assert "\n" not in str(caught.value)
    assert "tf_efficientnet_lite0.in1k weights" in str(caught.value) and "TRANSFER_ASSETS=DIR" in str(caught.value)
