"""One command timed as a user runs it: wall time from process start to exit, and its own peak RSS.

os.wait4 returns the resource usage of exactly the process it reaps (and of the children that process
reaped, such as DataLoader workers): unlike getrusage(RUSAGE_CHILDREN), whose peak is the largest of every
child this process ever had, it is one figure per command however many ran before it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Timed:
    seconds: float  # process start to exit
    peak_rss_mb: float  # the largest resident set of the process or of a child it waited for
    returncode: int

    def tail(self, log: Path, lines: int = 15) -> str:
        """The last lines of the command's output, for a failure's message."""
        text = log.read_text(errors="replace") if log.is_file() else ""
        return "\n".join(text.strip().splitlines()[-lines:])


def timed_command(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                  timeout: float = 1800) -> Timed:
    """Run `command` with stdout and stderr into `log`; killed (exit -9) past `timeout` seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    peak = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 1024  # bytes / KiB
    return Timed(seconds, peak, process.returncode)
