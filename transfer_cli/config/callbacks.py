"""Hydra callbacks named in conf/train.yaml: every torchrun rank resolves one run directory."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write

from transfer_cli.parallel import distributed


CONSOLE_ONLY_LOGGING = {
    "version": 1,
    "formatters": {"simple": {"format": "[%(asctime)s][rank %(process)d][%(levelname)s] - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "stream": "ext://sys.stderr"}},
    "root": {"level": "WARNING", "handlers": ["console"]},
    "disable_existing_loggers": False,
}


def agree_on_now() -> None:
    """Make `${now:...}` resolve to rank 0's time on every rank (no-op in a single process)."""
    if not distributed.active():
        return
    stamp = distributed.broadcast_object(_dt.datetime.now() if distributed.is_main() else None)
    OmegaConf.register_new_resolver("now", lambda pattern: stamp.strftime(pattern), use_cache=True, replace=True)


class AgreeOnRunDir(Callback):
    """Every torchrun rank resolves the same run (or sweep) directory.

    A single run's directory, and a sweep's clock-made one, are already pinned before Hydra
    starts (commands/train.py: rank 0 resolves, claims and locks, every rank gets the path
    as an override); this keeps every other `${now:}` (a launcher's job process) rank 0's.
    Runs after composition and before the directory is resolved. The run or sweep dir is
    resolved here once, with rank 0's `${now:}`, and cached in the config, so a later
    re-registration of Hydra's own resolver (the basic launcher does one) changes nothing.
    Ranks > 0 also stop writing `.hydra/` and the log file of the run.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._agree(config, "run")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._agree(config, "sweep")

    @staticmethod
    def _agree(config: Any, mode: str) -> None:
        distributed.init_from_env()
        if not distributed.active():
            return
        agree_on_now()
        str(config.hydra[mode].dir)  # resolve now: the cache keeps rank 0's time
        if not distributed.is_main() and mode == "run":
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
                config.hydra.job_logging = CONSOLE_ONLY_LOGGING
