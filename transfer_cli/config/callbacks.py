"""Hydra callbacks named in conf/train.yaml: every torchrun rank of a sweep resolves one sweep directory."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from transfer_cli.parallel import distributed


def agree_on_now() -> None:
    """Make `${now:...}` resolve to rank 0's time on every rank (no-op in a single process)."""
    if not distributed.active():
        return
    stamp = distributed.broadcast_object(_dt.datetime.now() if distributed.is_main() else None)
    OmegaConf.register_new_resolver("now", lambda pattern: stamp.strftime(pattern), use_cache=True, replace=True)


class AgreeOnRunDir(Callback):
    """Every torchrun rank of a sweep resolves the same sweep directory.

    A sweep's clock-made dir is pinned before Hydra starts (commands/train.py: rank 0 resolves
    it and every rank gets the path as an override); this keeps every other `${now:}` (a
    launcher's job process) rank 0's. The sweep dir is resolved here once, with rank 0's
    `${now:}`, and cached in the config, so a later re-registration of Hydra's own resolver
    (the basic launcher does one) changes nothing. A single run is claimed before Hydra runs it
    (config/compose.py), so it needs nothing here.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        distributed.init_from_env()
        if not distributed.active():
            return
        agree_on_now()
        str(config.hydra.sweep.dir)  # resolve now: the cache keeps rank 0's time
