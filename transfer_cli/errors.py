"""The one error type for user mistakes, and the single line the CLI prints for one."""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2


class TransferError(Exception):
    """A problem the user can fix: bad config, missing data, unavailable weights."""


def report_user_error(problem: object) -> int:
    """Print `problem` as the CLI's one-line error on stderr; returns the exit code for it."""
    print(f"transfer: error: {problem}", file=sys.stderr)
    return USER_ERROR_EXIT
