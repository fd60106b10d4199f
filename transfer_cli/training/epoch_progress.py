"""What a person sees inside an epoch: a tqdm bar on a terminal; elsewhere (SLURM, nohup, CI, a file) a
log line every `trainer.log_every` steps and at least every 30 seconds:
`epoch 3/20 [last_block] step 40/120 loss 0.412 acc 0.871 lr 1.0e-04 312 img/s eta 0:01:05`.

Reading the running loss and accuracy syncs with the device, so it happens only when a line is
written or the bar's numbers refresh (at most once a second), never on every step.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm


log = logging.getLogger(__name__)


def interactive() -> bool:
    """A person watches a terminal: both streams are one (a redirect of either means a log file)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class EpochProgress:
    """The bar or the log lines of one epoch (or of its rest, after a resume mid-epoch)."""

    def __init__(self, title: str, total_steps: int, start_step: int, batch_size: int, lrs: Callable[[], dict],
                 log_every: int, *, bar: bool | None = None, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.title, self.total, self.start_step, self.batch = title, total_steps, start_step, batch_size
        self.lrs, self.log_every, self.every_s, self.clock = lrs, max(1, log_every), every_s, clock
        self.bar_wanted = interactive() if bar is None else bar
        self.started = self.last_line = self.last_refresh = clock()
        self.bar: Any = None

    def wrap(self, loader: Iterable) -> Iterable:
        """The loader as the epoch iterates it (inside a tqdm bar on a terminal)."""
        if not self.bar_wanted:
            return loader
        self.bar = tqdm(loader, desc=self.title, total=self.total, initial=self.start_step, leave=False)
        return self.bar

    def step(self, step: int, tally: Any) -> None:
        """After optimizer step `step` of the epoch (counted from its start), with the epoch's running tally."""
        now = self.clock()
        if self.bar is not None:
            if now - self.last_refresh >= 1.0:
                self.bar.set_postfix_str(self._figures(tally), refresh=False)
                self.last_refresh = now
            return
        if (step - self.start_step) % self.log_every == 0 or now - self.last_line >= self.every_s or step == self.total:
            log.info("%s", self.line(step, tally, now))
            self.last_line = now

    def line(self, step: int, tally: Any, now: float) -> str:
        done, elapsed = step - self.start_step, max(now - self.started, 1e-9)
        lrs = self.lrs()
        lr = f" lr {max(lrs.values()):.1e}" if lrs else ""
        eta = datetime.timedelta(seconds=round((self.total - step) * elapsed / max(done, 1)))
        return (f"{self.title} step {step}/{self.total} {self._figures(tally)}{lr} "
                f"{done * self.batch / elapsed:.0f} img/s eta {eta}")

    @staticmethod
    def _figures(tally: Any) -> str:
        count = max(tally.count, 1)
        return f"loss {tally.loss.item() / count:.3f} acc {tally.hits[0].item() / count:.3f}"
