"""Tests reach the package only through its public names, and no test file imports another.

Every tests/*.py is parsed (never imported) and checked for each way a test can reach a private name
(one with a leading underscore, dunders excepted) of `transfer_cli`:

- importing one: `from transfer_cli.x import _name`, or a module on a private path (`transfer_cli._x`);
- reading or writing `_name` on a name bound to the package: a module (`import transfer_cli.x as m`,
  `from transfer_cli.x import m`) or any object imported from it (`DATASETS._items`);
- naming one as a string: `monkeypatch.setattr(module, "_name", ...)`, `getattr(module, "_name")`,
  `monkeypatch.setattr("transfer_cli.x._name", ...)`, `mock.patch("transfer_cli.x._name")`.

Private names of other libraries (torch's `DataLoader._iterator`) are theirs to keep, not ours: only names
reached from the package count. Test files share code through helpers.py and conftest.py only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest


TESTS = Path(__file__).resolve().parent
PACKAGE = "transfer_cli"
SHARED = {"helpers", "conftest"}  # the test modules every test file may import
NAMING_CALLS = {"setattr", "delattr", "getattr", "hasattr", "patch", "object", "import_module"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def in_package(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


def private_part(dotted: str) -> str | None:
    return next((part for part in dotted.split(".") if is_private(part)), None)


def is_test_module(module: str) -> bool:
    """`test_x`, `tests.test_x` or `tests` itself: a test file's code, not helpers.py or conftest.py."""
    parts = module.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return not parts or (parts[0] not in SHARED and parts[0].startswith("test_"))


Scope = ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef


class _Bindings(ast.NodeVisitor):
    """The names one scope binds (without descending into nested scopes): which are the package's."""

    def __init__(self, scope: Scope) -> None:
        self.local: set[str] = set()
        self.package: dict[str, str] = {}  # name: the package path it is bound to
        self.is_class = isinstance(scope, ast.ClassDef)  # a class body's names are not seen by its methods
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = scope.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None:
                    self.local.add(arg.arg)
        body = [scope.body] if isinstance(scope, ast.Lambda) else scope.body
        for node in body:
            self.visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.local.add(node.name)  # its body is a scope of its own; decorators and defaults are this one's
        for child in node.decorator_list:
            self.visit(child)
        if not isinstance(node, ast.ClassDef):
            for default in [*node.args.defaults, *node.args.kw_defaults]:
                if default is not None:
                    self.visit(default)

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store | ast.Del):
            self.local.add(node.id)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = alias.asname or alias.name.split(".")[0]
            self.local.add(name)
            if in_package(alias.name):
                self.package[name] = alias.name if alias.asname else PACKAGE

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            name = alias.asname or alias.name
            self.local.add(name)
            if node.level == 0 and in_package(node.module):
                self.package[name] = f"{node.module}.{alias.name}"


class Checker(ast.NodeVisitor):
    """Walks one file's tree with its scopes, collecting "line: what" for each reach."""

    def __init__(self) -> None:
        self.scopes: list[_Bindings] = []
        self.found: list[tuple[int, str]] = []

    def report(self, node: ast.AST, what: str) -> None:
        self.found.append((node.lineno, what))

    # -- scopes

    def visit_scope(self, node: Scope) -> None:
        self.scopes.append(_Bindings(node))
        self.generic_visit(node)
        self.scopes.pop()

    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_scope

    def package_path(self, name: str) -> str | None:
        """What `name` is bound to in the package where it is read (the innermost scope binding it decides)."""
        innermost = self.scopes[-1]
        for scope in reversed(self.scopes):
            if name in scope.local and (scope is innermost or not scope.is_class):
                return scope.package.get(name)
        return None

    def dotted(self, node: ast.AST) -> str | None:
        """`transfer_cli.x.y` for a name bound to the package or public attributes on one, else None."""
        if isinstance(node, ast.Name):
            return self.package_path(node.id)
        if isinstance(node, ast.Attribute) and not is_private(node.attr):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    # -- imports

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if is_test_module(alias.name):
                self.report(node, f"imports the test file {alias.name}")
            elif in_package(alias.name) and private_part(alias.name):
                self.report(node, f"imports the private module {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and is_test_module(module) and module != "tests":
            self.report(node, f"imports from the test file {module}")
        elif node.level == 0 and module == "tests":
            for alias in node.names:
                if is_test_module(alias.name):
                    self.report(node, f"imports the test file tests.{alias.name}")
        elif node.level == 0 and in_package(module):
            if private_part(module):
                self.report(node, f"imports from the private module {module}")
            for alias in node.names:
                if is_private(alias.name):
                    self.report(node, f"imports the private name {module}.{alias.name}")

    # -- attributes and names as strings

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if is_private(node.attr):
            base = self.dotted(node.value)
            if base:
                self.report(node, f"reaches the private {base}.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if called in NAMING_CALLS and node.args:
            first = node.args[0]
            second = node.args[1] if len(node.args) > 1 else None
            if called == "import_module" and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if is_test_module(first.value):
                    self.report(node, f"imports the test file {first.value}")
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and in_package(first.value):
                if private_part(first.value):
                    self.report(node, f"{called}() names the private {first.value}")
            elif isinstance(second, ast.Constant) and isinstance(second.value, str) and is_private(second.value):
                base = self.dotted(first)
                if base:
                    self.report(node, f"{called}() names the private {base}.{second.value}")
        self.generic_visit(node)


def reaches(source: str) -> list[tuple[int, str]]:
    """Each (line, what) in `source` that reaches a private name of the package or imports a test file."""
    checker = Checker()
    checker.visit(ast.parse(source))
    return sorted(checker.found)


def suite_files() -> Iterator[Path]:
    return iter(sorted(TESTS.glob("*.py")))


# --------------------------------------------------------------------------- the suite


def test_no_test_reaches_a_private_name_or_imports_another_test_file() -> None:
    found = [f"tests/{path.name}:{line}: {what}"
             for path in suite_files() for line, what in reaches(path.read_text(encoding="utf-8"))]
    assert not found, "tests go through public seams and share code via helpers.py:\n" + "\n".join(found)


def test_the_check_reads_every_test_file() -> None:
    names = {path.name for path in suite_files()}
    assert {"conftest.py", "helpers.py", Path(__file__).name} <= names and len(names) > 10


# --------------------------------------------------------------------------- the checker itself

# each snippet: the line the reach is on and the name the report must give
CAUGHT = {
    "private name imported": ("from transfer_cli.training.fit import _epoch", 1, "fit._epoch"),
    "private name among others": (
        "from transfer_cli.data.datasets import (\n    DATASETS,\n    _items,\n)", 1, "datasets._items"),
    "aliased private name": ("from transfer_cli.data import loaders as _loaders, _make as make", 1, "data._make"),
    "private module imported": ("import transfer_cli.training._hidden", 1, "training._hidden"),
    "from a private module": ("from transfer_cli._internal import thing", 1, "transfer_cli._internal"),
    "module bound by import as": ("import transfer_cli.training.fit as fit\nfit._epoch", 2, "fit._epoch"),
    "module bound by from-import": ("from transfer_cli.training import fit\nx = fit._epoch", 2, "fit._epoch"),
    "module reached by full path": (
        "import transfer_cli.training.fit\ntransfer_cli.training.fit._epoch()", 2, "fit._epoch"),
    "object imported from the package": (
        "from transfer_cli.data.datasets import DATASETS\nDATASETS._items['x'] = 1", 2, "DATASETS._items"),
    "private then deeper": (
        "from transfer_cli.data import loaders\nloaders._iterator._workers", 2, "loaders._iterator"),
    "private attribute written": ("from transfer_cli.training import fit\nfit._epoch = None", 2, "fit._epoch"),
    "import inside a test": (
        "def test_x():\n    from transfer_cli.training import fit\n    return fit._epoch", 3, "fit._epoch"),
    "module import used inside a test": (
        "from transfer_cli.training import fit\ndef test_x():\n    fit._epoch", 3, "fit._epoch"),
    "monkeypatch.setattr on a module": (
        "from transfer_cli.training import fit\n"
        "def test_x(monkeypatch):\n    monkeypatch.setattr(fit, '_epoch', None)", 3, "fit._epoch"),
    "MonkeyPatch.context setattr": (
        "import pytest\nimport transfer_cli.training.assemble as assemble\n"
        "with pytest.MonkeyPatch.context() as patch:\n    patch.setattr(assemble, '_runner', None)", 4,
        "assemble._runner"),
    "monkeypatch.delattr": (
        "from transfer_cli.training import fit\ndef t(m):\n    m.delattr(fit, '_epoch')", 3, "fit._epoch"),
    "builtin getattr": ("from transfer_cli.training import fit\ngetattr(fit, '_epoch')", 2, "fit._epoch"),
    "monkeypatch.setattr by dotted string": (
        "def t(monkeypatch):\n    monkeypatch.setattr('transfer_cli.training.fit._epoch', 1)", 2, "fit._epoch"),
    "mock.patch by dotted string": (
        "from unittest import mock\nwith mock.patch('transfer_cli.training.fit._epoch'):\n    pass", 2, "fit._epoch"),
    "import a test file": ("import test_resume", 1, "test_resume"),
    "import a test file as": ("import test_resume as resume", 1, "test_resume"),
    "from a test file": ("from test_resume import Crash, finish", 1, "test_resume"),
    "from tests.test_x": ("from tests.test_resume import Crash", 1, "test_resume"),
    "from tests import test_x": ("from tests import test_resume", 1, "test_resume"),
    "test file imported inside a function": ("def f():\n    from test_report import write_run", 2, "test_report"),
    "test file imported by importlib": ("import importlib\nimportlib.import_module('test_resume')", 2, "test_resume"),
    "a method reading the module's import past a class attribute": (
        "from transfer_cli.training import fit\nclass T:\n    fit = None\n    def m(self):\n        fit._epoch", 5,
        "fit._epoch"),
}

ALLOWED = {
    "public names": (
        "from transfer_cli.training import fit\nfrom transfer_cli.cli import main\nfit.train_epoch; main([])"),
    "dunders": (
        "import transfer_cli\nfrom transfer_cli import api\ntransfer_cli.__version__; api.__getattr__; api.__all__"),
    "a dunder imported": "from transfer_cli import __version__",
    "another library's private": "import torch\nfrom torch import nn\ntorch._dynamo; nn.modules.batchnorm._BatchNorm",
    "private attribute of a package object's result": (
        "from transfer_cli.data.loaders import make_loader\nloader = make_loader()\niter(loader)._workers"),
    "a local shadowing a package name": (
        "from transfer_cli.data import loaders\ndef test_x(loaders):\n    loaders._iterator"),
    "a local assigned over a package name": (
        "from transfer_cli.training import fit\ndef test_x():\n    fit = object()\n    fit._private"),
    "monkeypatch of a public name": (
        "from transfer_cli.training import fit\ndef t(m):\n    m.setattr(fit, 'train_epoch', 1)"),
    "monkeypatch of another library": (
        "import torch\ndef t(m):\n    m.setattr(torch, '_C', 1)\n    m.setattr('torch._C', 1)"),
    "monkeypatch of a public dotted string": "def t(m):\n    m.setattr('transfer_cli.training.fit.train_epoch', 1)",
    "the shared helpers and fixtures": (
        "from helpers import build\nfrom conftest import FAST\nimport helpers\nimport conftest\n"
        "from tests import helpers"),
    "a hydra config's _target_": "cfg = compose()\ncfg.hydra.launcher._target_",
    "a private-looking string that is no reach": "logger = 'transfer_cli.training._x'",
    "a module whose name starts with test": "import testfixtures\nfrom transfer_cli.lesson import testing\ntesting.run",
    "a method reading a class attribute's namesake": (
        "class T:\n    from transfer_cli.training import fit\n    def m(self, fit):\n        fit._x"),
}


@pytest.mark.parametrize(("source", "line", "name"), CAUGHT.values(), ids=CAUGHT.keys())
def test_the_check_catches(source: str, line: int, name: str) -> None:
    found = reaches(source)
    assert len(found) == 1, found
    assert found[0][0] == line and name in found[0][1], found


@pytest.mark.parametrize("source", ALLOWED.values(), ids=ALLOWED.keys())
def test_the_check_allows(source: str) -> None:
    assert reaches(source) == []


def test_a_report_names_the_line_and_the_full_name() -> None:
    source = ("from transfer_cli.training import fit\n\n\n"
              "def test_x(monkeypatch):\n    monkeypatch.setattr(fit, '_epoch', 1)\n    fit._loop\n")
    assert reaches(source) == [(5, "setattr() names the private transfer_cli.training.fit._epoch"),
                               (6, "reaches the private transfer_cli.training.fit._loop")]
