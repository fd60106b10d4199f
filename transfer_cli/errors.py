"""The exceptions the CLI turns into exit codes (user mistakes: one line, exit 2; Ctrl-C: 130)."""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2


class TransferError(Exception):
    """A problem the user can fix: bad config, missing data, unavailable weights."""


class Interrupted(Exception):
    """Ctrl-C: a resumable checkpoint was saved; the CLI exits with 130."""


def report_user_error(problem: object) -> int:
    """Print `problem` as the CLI's one-line error on stderr; returns the exit code for it."""
    print(f"transfer: error: {problem}", file=sys.stderr)
    return USER_ERROR_EXIT
