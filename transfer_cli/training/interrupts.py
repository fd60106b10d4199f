"""Ctrl-C and SIGTERM during a run: checkpoint and stop after the current step, or stop while it is built."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

from transfer_cli.core.errors import Interrupted


log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # what a shell reports for a process these killed


class InterruptFlag:
    """Ctrl-C or SIGTERM asks the loop to checkpoint and stop after the current step.

    SIGTERM is what SLURM and Kubernetes send before preempting a job (SIGKILL follows after a
    grace period), so it gets Ctrl-C's treatment instead of killing the run between checkpoints.
    A second signal is immediate: Ctrl-C raises KeyboardInterrupt, SIGTERM terminates at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in EXIT_CODES}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "a second SIGTERM"
        log.warning("%s: saving a resumable checkpoint after this step (%s aborts at once)",
                    signal.Signals(signum).name, again)

    def stopped(self, where: str) -> Interrupted:
        """What ends the run once its checkpoint is saved; under DDP a rank may stop for another's signal."""
        what = "terminated by SIGTERM" if self.signum == signal.SIGTERM else "interrupted"
        return Interrupted(f"{what} {where}", exit_code=EXIT_CODES.get(self.signum, 130))

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler Python did not install, which it cannot restore
                signal.signal(signum, previous)


@contextlib.contextmanager
def sigterm_stops(where: str) -> Iterator[None]:
    """SIGTERM while a run is built (decoding images, downloading weights: minutes, before the loop's
    own handler is up) ends it at once with a line and exit 143, not silently; there is no checkpoint
    to save yet, and `transfer resume` starts it from the beginning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> NoReturn:
        raise Interrupted(f"terminated by SIGTERM {where}", exit_code=EXIT_CODES[signal.SIGTERM])

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
