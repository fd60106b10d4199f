"""The exceptions the CLI turns into exit codes (user mistakes: one line, exit 2; Ctrl-C: 130; SIGTERM: 143)."""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path


USER_ERROR_EXIT = 2
BUG_EXIT = 1
INTERRUPT_EXIT = 130


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


def bug_line(error: BaseException, log: Path | None, then: str = "") -> str:
    """The one line a bug ends with; its full traceback goes to `log` (a temp file when None or unwritable).

    `then` says what to do next (e.g. the resume command of a run that keeps its checkpoints).
    """
    text = f"command: {' '.join(sys.argv)}\n" + "".join(traceback.format_exception(error))
    if log is not None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW  # a link there: the temp file instead
            with open(os.open(log, flags, 0o666), "w", encoding="utf-8") as file:
                file.write(text)
        except OSError:  # the run dir is gone or full: the traceback still goes somewhere
            log = None
    if log is None:
        with tempfile.NamedTemporaryFile("w", prefix="transfer-error-", suffix=".log", delete=False,
                                         encoding="utf-8") as file:
            file.write(text)
        log = Path(file.name)
    message = str(error).strip().splitlines()
    what = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    return f"transfer: internal error ({what}); full traceback in {log}{then}"


def failure(error: BaseException, log: Path | None, then: str = "", run_dir: Path | None = None) -> tuple[int, str]:
    """The exit code and the one line an unexpected exception ends a command with: a full disk is the user's to
    fix (2: what was being written, free space, and `then` or run it again), anything else a bug (1: bug_line)."""
    full = _disk_full(error)
    if full is None:
        return BUG_EXIT, bug_line(error, log, then)
    file = _written_file(full.filename)
    where = f" writing {file}" if file else f" writing into {run_dir}" if run_dir else ""
    next_step = f"free space, then {then.removeprefix('; ')}" if then else "free space and run the command again"
    what = (full.strerror or "no space left on device").lower()
    return USER_ERROR_EXIT, f"transfer: error: {what}{where}: {next_step}"


FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or the user's quota spent


def _disk_full(error: BaseException | None) -> OSError | None:
    """The full-disk OSError behind `error`, if any: torch.save reports one as a RuntimeError raised while
    handling it, so the chain of causes is searched."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in FULL:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _written_file(name: object) -> str:
    """The file a write was for ("" where unknown): atomic writes go through `.<name>.<random>.tmp` beside it."""
    if not isinstance(name, (str, bytes)):
        return ""
    path = Path(os.fsdecode(name))
    temp = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    return str(path.with_name(temp.group(1)) if temp else path)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def torch_file_problem(file: Path, error: Exception) -> str:
    """Why `torch.load(file, weights_only=True)` failed, in words (its own messages run to many lines)."""
    import pickle
    import zipfile

    if file.stat().st_size == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain containers, which are not loaded (weights_only)"
    if not zipfile.is_zipfile(file):
        return "not a whole PyTorch file (cut short, or another kind of file)"
    return f"{type(error).__name__}: {first_line(error)[:160]}"
