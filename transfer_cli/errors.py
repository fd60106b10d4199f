"""The exceptions the CLI turns into exit codes (user mistakes: one line, exit 2; Ctrl-C: 130; SIGTERM: 143)."""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2


class TransferError(Exception):
    """A problem the user can fix: bad config, missing data, unavailable weights."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: a resumable checkpoint was saved; the CLI exits with `exit_code`.

    130 for Ctrl-C (SIGINT), 143 for SIGTERM (what SLURM and Kubernetes send before
    preemption): the codes a shell reports for a process those signals killed.
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return type(self), (str(self), self.exit_code)  # launchers pickle it across processes: keep the code


def report_user_error(problem: object) -> int:
    """Print `problem` as the CLI's one-line error on stderr; returns the exit code for it."""
    print(f"transfer: error: {problem}", file=sys.stderr)
    return USER_ERROR_EXIT
