"""transfer: a command-line experiment runner for image transfer learning."""

from __future__ import annotations

import importlib
from typing import Any


__version__ = "0.1.0"

# The Python API (transfer_cli/api.py), loaded on first use: `import transfer_cli` imports neither torch
# nor Hydra, so `transfer --help` stays fast.
_API = ("train", "load_run", "lr_find", "Callback")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module("transfer_cli.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
