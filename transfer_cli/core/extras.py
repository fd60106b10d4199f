"""Optional extras: whether a feature's package is installed, and the install hint when it is not.

A missing extra must leave every other command working, so nothing here imports the
packages themselves; `find_spec` of a dotted name raises when its parent is absent
(`hydra_plugins` exists only once some Hydra plugin is installed), hence `installed`.
"""

from __future__ import annotations

import importlib.util


# A `transfer train` override (key=value prefix) -> (module it needs, extra that installs it).
PLUGIN_OVERRIDES = {
    "hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "search"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "search"),
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "cluster"),
    "hydra/launcher=submitit": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
    "logger=tensorboard": ("tensorboard", "tensorboard"),
    "logger=mlflow": ("mlflow", "mlflow"),
    "logger=wandb": ("wandb", "wandb"),
}


def installed(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a half-installed one
        return False


def install_hint(extra: str) -> str:
    return f"pip install -e \".[{extra}]\""


def missing_plugin(argv: list[str]) -> str | None:
    """The first override that needs a Hydra plugin which is not installed, as a one-line hint."""
    for arg in argv:
        override = arg.lstrip("+~")
        if override.endswith("=null"):
            continue
        for prefix, (module, extra) in PLUGIN_OVERRIDES.items():
            if override.startswith(prefix) and not installed(module):
                what = "plugin" if module.startswith("hydra_plugins.") else "package"
                return f"{arg} needs the {module.split('.')[-1]} {what}: {install_hint(extra)}"
    return None
