"""The package's shape, read from its imports: layers that import only downward, no circle, Hydra kept
inside config/, the epoch loop free of it, small modules (docs: README's layout section)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


PACKAGE = REPO / "transfer_cli"
# Each package may import its own modules and the packages listed before it, never one after it.
LAYERS = ["core", "parallel", "config", "models", "data", "runs", "inference", "training", "lesson", "benchmarks",
          "commands"]
# the package itself (its version, and the Python API's names, loaded lazily) and the two entry points
TOP = {"transfer_cli": 0, "transfer_cli.__main__": len(LAYERS), "transfer_cli.cli": len(LAYERS),
       "transfer_cli.api": len(LAYERS)}
MAX_LINES = 380  # one job per module: cohesion over a cap (stages.py resolves and enters a stage)
MAX_HYDRA_MODULES = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside a function (a lazy import is still a dependency)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {dep for dep in imports_of(path) if dep in known and dep != name} for name, path in known.items()}


def layer(name: str) -> int:
    if name in TOP:
        return TOP[name]
    return LAYERS.index(name.split(".")[1])


def test_every_package_is_a_known_layer() -> None:
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()} - {"conf"}
    assert packages == set(LAYERS)


def test_imports_run_downward_only() -> None:
    upward = [f"{name} ({LAYERS[layer(name)] if layer(name) < len(LAYERS) else 'top'}) imports {dep}"
              for name, deps in internal_graph().items() for dep in deps
              if layer(dep) > layer(name) and dep != "transfer_cli"]
    assert not upward, "\n".join(upward)


def test_no_import_circle() -> None:
    graph = internal_graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)


def test_nothing_imports_a_command() -> None:
    """Only the command line's entry points (cli.py, __main__.py) reach the commands: the Python API (api.py)
    calls the layers below them, as the commands do."""
    importers = [f"{name} imports {dep}" for name, deps in internal_graph().items() for dep in deps
                 if dep.startswith("transfer_cli.commands.") and not name.startswith("transfer_cli.commands.")
                 and name not in {"transfer_cli.cli", "transfer_cli.__main__"}]
    assert not importers, "\n".join(importers)


def test_hydra_and_omegaconf_stay_in_the_config_package() -> None:
    users = sorted(name for name, path in modules().items()
                   if any(dep.split(".")[0] in {"hydra", "omegaconf"} for dep in imports_of(path)))
    assert users and all(name.startswith("transfer_cli.config.") for name in users), users
    assert len(users) <= MAX_HYDRA_MODULES, users


@pytest.mark.parametrize("module", ["transfer_cli.training.loop", "transfer_cli.training.fit",
                                    "transfer_cli.inference.predict", "transfer_cli.commands.predict"])
@pytest.mark.slow
def test_the_training_loop_and_predict_load_no_hydra(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.slow
def test_predict_loads_neither_the_trainer_nor_the_optimizer() -> None:
    code = ("import sys, transfer_cli.commands.predict; "
            "print(sorted(set(sys.modules) & {'transfer_cli.training.fit', 'transfer_cli.training.optim'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_modules_stay_small() -> None:
    long = {name: lines for name, path in modules().items()
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long
