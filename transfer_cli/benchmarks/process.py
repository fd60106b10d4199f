"""One command timed as a user runs it: wall time from process start to exit, and its own peak RSS.

Linux counts into a process's peak RSS (ru_maxrss) the memory of whatever it was before exec: a process forked
from this one, which holds torch, starts at this one's resident set. So the command is started by LAUNCHER, a
bare interpreter of a few MB, which times it and reaps it with os.wait4: the usage of exactly that process (and
of the children it reaped, such as DataLoader workers), one figure per command however many ran before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


# `python -c LAUNCHER OUT COMMAND...`: run COMMAND, write its wall seconds, peak RSS and exit code to OUT
LAUNCHER = """
import json, os, subprocess, sys, time
out, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
process = subprocess.Popen(command)
_, status, usage = os.wait4(process.pid, 0)
seconds = time.perf_counter() - start
peak = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 1024  # bytes / KiB
with open(out, "w") as file:
    json.dump({"seconds": seconds, "peak_rss_mb": peak, "returncode": os.waitstatus_to_exitcode(status)}, file)
"""


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
    """Run `command` with stdout and stderr into `log`; it and its children are killed past `timeout` seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="transfer-timed-") as tmp, open(log, "w") as out:
        result = Path(tmp) / "timed.json"
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(result), *command], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            return Timed(float(timeout), 0.0, -signal.SIGKILL)
        if not result.is_file():
            return Timed(0.0, 0.0, launcher.returncode or 1)
        return Timed(**json.loads(result.read_text()))
