"""Whether the ember code an agent has loaded is still the code on disk.

An agent imported ember once; after an upgrade (or an edit of an editable
install) it would go on running the old code.  The agent notes every loaded
ember module file's identity when it starts and checks them again before each
command; on a difference it declines the command, which then runs in the
caller with the new code, and stops.

Checking means ~130 stat calls, ~0.9 ms in a freshly forked relay.  An
inotify descriptor on the files' directories, taken before the identities,
says whether anything in them changed: while it has nothing to read, and each
directory's path still leads to the directory watched (~15 stat calls: a
release or virtualenv swapped in above them, or a symlink re-pointed, changes
that), the files' own stat calls are skipped.  (A file changed through a hard
link in another directory goes unnoticed then: inotify tells a directory of
changes made through its own entries.  Installers and editors write through
the path.)  Where inotify is unavailable (no watches left), every check stats
every file.
"""

from __future__ import annotations

import ctypes
import os
import select
import sys
from collections.abc import Iterable

Stamp = tuple[int, int, int, int]  # inode, size, mtime and ctime in ns


def _stamp(path: str) -> Stamp | None:
    # ctime too: a write in place of the same size whose mtime was put back (rsync
    # --inplace, cp -p, an archive unpacked over the tree) changes only that
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def loaded_files(package: str = "ember") -> list[str]:
    prefix = package + "."
    files = []
    for name, module in list(sys.modules.items()):
        if name == package or name.startswith(prefix):
            path = getattr(module, "__file__", None)
            if path:
                files.append(path)
    return sorted(files)


class Fingerprint:
    def __init__(self, files: Iterable[str]) -> None:
        files = list(files)
        directories = sorted({os.path.dirname(path) for path in files})
        # In this order: a tree swapped in before the watch is set makes the
        # directories' identities differ (every check stats then); a file changed
        # while the stamps are taken leaves an event.
        self._directories = {d: _identity(d) for d in directories}
        self._watch = _watch(directories)
        self.stamps = {path: _stamp(path) for path in files}

    @property
    def watching(self) -> bool:
        """Whether inotify tells when checking is needed (else every check stats)."""
        return self._watch is not None

    def descriptors(self) -> tuple[int, ...]:
        """What a process forked to run a command should close (the watch)."""
        return () if self._watch is None else (self._watch,)

    def changed(self) -> str | None:
        """The first file that changed or vanished since the fingerprint was taken."""
        if self._watch is not None:
            if not _readable(self._watch) and all(
                _identity(d) == identity for d, identity in self._directories.items()
            ):
                return None
            # Before the stat calls: what changes after one of them leaves an event for
            # the next check (drained after, it would be lost, and the change with it).
            _drain(self._watch)
        for path, stamp in self.stamps.items():
            if _stamp(path) != stamp:
                return path
        return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# <sys/inotify.h>
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF = 0x400, 0x800
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_CHANGES = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
    | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
)  # fmt: skip


def _watch(directories: Iterable[str]) -> int | None:
    """An inotify descriptor watching ``directories`` for changes to what they hold (and
    to themselves); None if one cannot be had."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    for directory in directories:
        if libc.inotify_add_watch(fd, os.fsencode(directory), _CHANGES) < 0:
            os.close(fd)  # a directory left unwatched would hide its changes
            return None
    return int(fd)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass
