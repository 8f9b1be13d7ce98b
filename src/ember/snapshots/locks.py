"""File locks (flock) that die with their process.

A kill -9 releases every flock, which is what lets ``recover`` and ``gc`` tell
a half-built snapshot whose builder died (lock free) from one being built right
now (lock held).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ember.snapshots.errors import SnapshotInUse


class FileLock:
    """An flock on ``path``; shared or exclusive, blocking or not.

    When ``path`` may be deleted by its holder (``unlink_on_release``), a waiter
    that wakes up re-checks that the path still names the inode it locked, so
    two processes never both believe they hold it.
    """

    def __init__(
        self, path: Path, *, shared: bool = False, unlink_on_release: bool = False
    ) -> None:
        self.path = path
        self.shared = shared
        self.unlink_on_release = unlink_on_release
        self.fd = -1

    def acquire(self, blocking: bool = True) -> bool:
        op = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        while True:
            # O_NOFOLLOW: a symlink planted in the state directory never makes the lock
            # create or open a file elsewhere.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    """The lock if it is free right now, else None."""
    lock = FileLock(path, shared=shared)
    try:
        return lock if lock.acquire(blocking=False) else None
    except FileNotFoundError:
        return None


def require_lock(path: Path, what: str, *, shared: bool = False) -> FileLock:
    lock = try_lock(path, shared=shared)
    if lock is None:
        raise SnapshotInUse(f"{what} is in use by another ember process")
    return lock
