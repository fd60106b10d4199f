"""docs/exercises.md's quick-mode tables come from the targets' own files: `transfer exercise tables` splices
them in (all or nothing), and a re-run of `make exercise3 QUICK=1` prints the tables the docs show."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from transfer_cli.cli import main
from transfer_cli.core.errors import TransferError
from transfer_cli.lesson.doc_tables import machine, made_on, splice, table_text, tables

from conftest import REPO
from helpers import one_error_line, parse_markdown


DOC = REPO / "docs" / "exercises.md"
DOCUMENT = """# Title

<!-- tables made on torch 0.0, NONE, z80 -->
text before, kept as it is
<!-- table: ex1/results.md -->
| old | table |
<!-- /table -->
between
<!-- table: ex2/epochs.md -->
<!-- /table -->
after
"""


@pytest.fixture
def results(tmp_path: Path) -> Path:
    source = tmp_path / "exercises"
    (source / "ex1").mkdir(parents=True)
    (source / "ex2").mkdir()
    (source / "ex1" / "results.md").write_text(f"Shared: dataset.root={tmp_path}/assets/data/x\n\n| new | table |\n")
    (source / "ex2" / "epochs.md").write_text("| epoch |\n| --- |\n| 1 |\n")
    return source


def call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["exercise", "tables", *argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_splice_replaces_each_marked_table_by_its_file_and_nothing_else(results: Path, tmp_path: Path) -> None:
    spliced = splice(DOCUMENT, results, assets=str(tmp_path / "assets"), made_on="torch 9, AVX2, x86_64")
    assert tables(spliced) == {"ex1/results.md": "Shared: dataset.root=$ASSETS/data/x\n\n| new | table |",
                               "ex2/epochs.md": "| epoch |\n| --- |\n| 1 |"}
    assert made_on(spliced) == "torch 9, AVX2, x86_64"
    outside = re.sub(r"<!-- table: .*?<!-- /table -->", "T", spliced, flags=re.S)
    assert outside == re.sub(r"<!-- table: .*?<!-- /table -->", "T", DOCUMENT, flags=re.S).replace(
        "torch 0.0, NONE, z80", "torch 9, AVX2, x86_64")
    assert splice(spliced, results, str(tmp_path / "assets"), "torch 9, AVX2, x86_64") == spliced  # idempotent


def test_the_command_rewrites_the_document_or_leaves_it_whole(results: Path, tmp_path: Path, capsys) -> None:
    doc = tmp_path / "exercises.md"
    doc.write_text(DOCUMENT)
    code, out, _ = call(capsys, "--from", str(results), "--into", str(doc))
    assert code == 0 and "rewrote 2 tables" in out
    assert tables(doc.read_text())["ex1/results.md"].endswith("| new | table |")
    assert made_on(doc.read_text()) == machine()
    written = doc.read_text()
    (results / "ex2" / "epochs.md").unlink()
    code, out, err = call(capsys, "--from", str(results), "--into", str(doc))
    assert "ex2/epochs.md does not exist: run what writes it first (make exercise2 QUICK=1)" in (
        one_error_line(code, err, out=out))
    assert doc.read_text() == written
    code, out, err = call(capsys, "--from", str(results), "--into", str(tmp_path / "nowhere.md"))
    assert "nowhere.md does not exist" in one_error_line(code, err, out=out)
    with pytest.raises(TransferError, match="marks no table"):
        splice("# no markers\n", results)


def test_the_docs_mark_every_quick_table_with_a_file_a_target_writes() -> None:
    marked = tables(DOC.read_text(encoding="utf-8"))
    assert {f"ex{n}/results.md" for n in range(1, 6)} <= set(marked)
    assert {f"ex{n}/epochs.md" for n in range(1, 5)} <= set(marked)
    assert all(re.fullmatch(r"ex[1-5]/(results|epochs)\.md", name) for name in marked)
    assert made_on(DOC.read_text(encoding="utf-8"))


NUMBER = re.compile(r"\d+\.\d+")


def cells(table: str) -> tuple[list[list[float]], list[dict[str, str]]]:
    """A report table's accuracy figures as numbers, and its other cells as text (the wall time left out)."""
    rows = parse_markdown(table)
    figures = [[float(x) for key, cell in row.items() if "acc" in key for x in NUMBER.findall(cell)] for row in rows]
    text = [{key: cell for key, cell in row.items() if "acc" not in key and key != "wall time (s)"} for row in rows]
    return figures, text


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.slow
def test_a_rerun_of_exercise3_quick_prints_the_tables_the_docs_show(assets: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(["make", "-s", "exercise3", "QUICK=1", f"ASSETS={assets}", f"EXERCISES={tmp_path}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    document = DOC.read_text(encoding="utf-8")
    shown = tables(document)
    for name in ("ex3/results.md", "ex3/epochs.md"):
        (got, got_text), (want, want_text) = cells(table_text(tmp_path, name, str(assets))), cells(shown[name])
        assert got_text == want_text, name
        if made_on(document) == machine():  # the same kernels: every figure but the wall time to the last digit
            assert got == want, name
        else:  # another machine's kernels may round an image or two differently (1 of 153 val images: 0.0065)
            assert len(got) == len(want) and all(g == pytest.approx(w, abs=0.02) for g, w in zip(got, want)), name
