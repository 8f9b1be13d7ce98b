"""File locks (flock) that die with their process.

A kill -9 releases every flock, which is what lets ``recover`` and ``gc`` tell
a half-built snapshot whose builder died (lock free) from one being built right
now (lock held), and why a lock file left behind is never stale.

Every lock file is opened with O_NOFOLLOW: a symlink planted in the state
directory never makes a lock create or open a file elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

#: what a command prints (one line on stderr) before it blocks on a lock
Notice = Callable[[str], None]


def waiting_message(lock: Path) -> str:
    return f"waiting for another ember command to finish (it holds {lock})..."


class FileLock:
    """An flock on ``path``; shared or exclusive, blocking or not.

    The lock file is made (``mode``, less the umask) if missing; its directory
    is not: a lock inside a directory that was removed fails with
    FileNotFoundError rather than bring the directory back.

    A waiter that wakes up re-checks that the path still names the inode it
    locked, so that when ``path`` may be deleted by its holder
    (``unlink_on_release``) two processes never both believe they hold it.

    ``notice``: told (``waiting_message``) before a blocking ``acquire`` waits
    for another process.

    ``release`` closes the descriptor and never unlocks explicitly: a forked
    child that releases its copy leaves its parent's lock held.
    """

    def __init__(
        self,
        path: Path,
        *,
        shared: bool = False,
        unlink_on_release: bool = False,
        notice: Notice | None = None,
        mode: int = 0o600,
    ) -> None:
        self.path = path
        self.shared = shared
        self.unlink_on_release = unlink_on_release
        self.notice = notice
        self.mode = mode
        self.fd = -1

    def acquire(self, blocking: bool = True) -> bool:
        if blocking and self.notice is not None:
            if self._acquire(fcntl.LOCK_NB):
                return True
            self.notice(waiting_message(self.path))
        return self._acquire(0 if blocking else fcntl.LOCK_NB)

    def _acquire(self, nonblocking: int) -> bool:
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | nonblocking
        while True:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, self.mode
            )
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.unlink_on_release and not self.shared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path, *, shared: bool = False) -> FileLock | None:
    """The lock if it is free right now, else None (None too when its directory is gone)."""
    lock = FileLock(path, shared=shared)
    try:
        return lock if lock.acquire(blocking=False) else None
    except FileNotFoundError:
        return None


def is_held(path: Path) -> bool:
    """Whether some process holds the lock file ``path`` right now.  Only looks: makes no
    lock file (a missing one is held by nobody), and drops the lock it takes to find out.
    One that cannot be opened (a symlink in its place, no permission) counts as held:
    callers leave alone what it guards."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
