"""One run directory, one run, one writer.

A process that writes a run directory (`transfer train`, `transfer resume`, a sweep job)
holds an advisory lock, `fcntl.flock` on `<run dir>/.lock`, for as long as it writes; a
second writer fails in one line naming the directory and the holder. The kernel drops the
lock when its holder exits however it exits (SIGKILL included), so a stale file never
blocks a resume. The file is never deleted while its run lives: deleting a locked file lets
a newcomer lock a fresh inode beside the old holder. Locking a directory neither creates nor
changes any file but `.lock`; refusing one changes nothing.

A new run gets a directory that holds no run: a name the user chose that holds one is
refused (pointing to `transfer resume` or a new directory), and a name made from the clock
(`${now:...}`) gets a suffix when it is taken, so runs started in the same second differ.

Nothing of the user's is written: a chosen directory that holds no run but holds an entry a
run writes (RUN_WRITES: Hydra's `.hydra/` and `train.log` above all, which Hydra writes
before the run starts, over or onto the user's files) is refused up front; one holding only
other files gets the run beside them, and `claim_new` records them so that a run that fails
before its first checkpoint removes only what it added. A run directory's files must be its
own: locking one refuses it while an entry a run writes (or one inside `.hydra/`,
`checkpoints/`, `eval/`) is a symbolic link, since writing, appending or cleaning up there
would change files elsewhere; a symlinked `checkpoints/` too (put the whole run directory on
the other disk instead). The lock file itself is opened without following a link.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import shlex
import socket
from pathlib import Path
from typing import Any

from transfer_cli.core.errors import TransferError
from transfer_cli.core.files import NotOwnFile, link_problem, open_own
from transfer_cli.parallel import distributed
from transfer_cli.runs.lr_find_files import LR_FIND_FILES, holds_lr_find


LOCK_NAME = ".lock"
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints")  # any of them: the directory holds a run
# every entry a run writes at the top of its directory but the lock; Hydra writes the first two before the run starts
RUN_WRITES = ("train.log", ".hydra", *RUN_FILES, "plan.json", "curves.png", "eval", "error.log", "tensorboard", "wandb",
              "mlflow_run_id", "wandb_run_id", *LR_FIND_FILES)
OWN_FOLDERS = (".hydra", "checkpoints", "eval")  # folders whose entries are checked for links too
MAX_SUFFIX = 10_000


class RunDirBusy(TransferError):
    """Another process is writing the run directory (it is left alone: never discarded)."""


_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep its parent's lock alive after a SIGKILL of
    the parent: close its copies (never LOCK_UN, which would unlock the parent too)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """An exclusive flock on a run directory's `.lock`, released on `release()` or process exit."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd = run_dir, fd
        self.held_before: frozenset[str] = frozenset()  # what a new run's directory held before its claim
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd >= 0:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(run_dir: Path, command: str) -> RunLock:
    """Lock `run_dir` (made if missing) for this process, or raise RunDirBusy naming the holder (NotOwnFile
    where an entry a run writes is a symbolic link: nothing is created then)."""
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise TransferError(f"{run_dir} is a file, not a directory: give a directory for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(run_dir)
    path = run_dir / LOCK_NAME
    while True:
        fd = open_own(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(f"{run_dir} is being written by {holder}: wait for it to end, "
                             "or give another directory") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the file was removed (a discarded run) between open and lock: lock the new one
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"`{command}` (pid {os.getpid()} on {socket.gethostname()}, since {stamp})\n".encode())
    return RunLock(run_dir, fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.lstat(path).st_ino
    except FileNotFoundError:
        return False


def holder(run_dir: Path) -> str | None:
    """Who is writing `run_dir` now, or None; creates nothing."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 4096).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken
    return None


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def refuse_if_run(run_dir: Path) -> None:
    """One line when `run_dir` holds a run (a new run must never write into it); reads only."""
    if not holds_run(run_dir):
        return
    busy = holder(run_dir)
    if busy:
        raise RunDirBusy(f"{run_dir} is being written by {busy}: give another directory")
    if holds_lr_find(run_dir):
        raise TransferError(f"{run_dir} holds an lr range test (`transfer lr-find`): give a new hydra.run.dir")
    if (run_dir / "summary.json").is_file():
        raise TransferError(f"{run_dir} already holds a finished run: give a new hydra.run.dir "
                            "(or none: each run gets its own under outputs/runs/)")
    if not (run_dir / "config.yaml").is_file():  # no run's config: nothing `transfer resume` could continue
        refuse_written_names(run_dir)
    raise TransferError(f"{run_dir} holds an interrupted run: continue it with `{resume_command(run_dir)}`, "
                        "or give a new hydra.run.dir")


def resume_command(run_dir: Path) -> str:
    """The command that continues `run_dir`, quoted for a shell (a path with spaces, commas or quotes)."""
    return f"transfer resume {shlex.quote(str(run_dir))}"


def refuse_written_names(run_dir: Path) -> None:
    """One line when `run_dir` holds an entry a run writes (a link too, even a dangling one): a new run writes
    into an empty or new directory, or beside other files, never over or onto one of them."""
    taken = [name for name in RUN_WRITES if os.path.lexists(run_dir / name)]
    if taken:
        raise TransferError(f"{run_dir} is not empty and holds files this run would write ({', '.join(taken)}): "
                            "give an empty or new directory")


def refuse_links(run_dir: Path) -> None:
    """NotOwnFile naming the first entry a run writes that is a symbolic link (the directory's own name, which
    the user gave, aside)."""
    for name in (LOCK_NAME, *RUN_WRITES):
        path = run_dir / name
        inside = sorted(path.iterdir()) if name in OWN_FOLDERS and path.is_dir() and not path.is_symlink() else []
        for entry in (path, *inside):
            if entry.is_symlink():
                raise NotOwnFile(link_problem(entry))


def unused_dir(run_dir: Path) -> Path:
    """`run_dir`, or `run_dir`_2, _3, ... when taken: made here (mkdir is atomic), so no other process gets it."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, MAX_SUFFIX):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise TransferError(f"{run_dir} and {MAX_SUFFIX - 2} numbered variants exist: clean up {run_dir.parent}")


def claim_new(run_dir: Path, from_clock: bool, command: str) -> RunLock:
    """Lock a directory for a new run: a clock-made name gets a suffix when taken, a chosen one that
    holds a run, or an entry a run writes, is refused. The lock records what the directory held before."""
    if from_clock:
        run_dir = unused_dir(run_dir)
    else:
        refuse_if_run(run_dir)  # before anything is written, the lock file included
        refuse_written_names(run_dir)
    before = frozenset(entry.name for entry in run_dir.iterdir()) if run_dir.is_dir() else frozenset()
    lock = acquire(run_dir, command)
    try:
        refuse_if_run(run_dir)  # another writer may have started and ended in between
        refuse_written_names(run_dir)
    except TransferError:
        lock.release()
        raise
    lock.held_before = before
    return lock


def hold_on_main(run_dir: Path, command: str) -> contextlib.AbstractContextManager[Any]:
    """Rank 0 locks `run_dir` (the rank that writes); every rank learns whether it could."""
    lock, problem = None, None
    if distributed.is_main():
        try:
            lock = acquire(run_dir, command)
        except (RunDirBusy, NotOwnFile) as error:
            problem = error
    problem = distributed.broadcast_object(problem)
    if problem:
        raise problem
    return lock if lock is not None else contextlib.nullcontext()
