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

A file changed while the agent was starting (between its import and the
stamps: an upgrade writing files as a restarted agent imports them) would be
stamped as it is now, and the agent would serve what it imported before; so a
loaded file changed since shortly before the agent's process began counts as
changed at the first check.  The dependencies installed beside ember (click,
httpx, rich, ...) are fingerprinted too: an upgrade of one (a security fix)
must reach the commands as ember's own does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import sys
import sysconfig
import time
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
    """The files of ``package``'s loaded modules, and of every loaded module installed
    beside it (in site-packages: its dependencies)."""
    prefix = package + "."
    installed = tuple(os.path.join(p, "") for p in package_dirs())
    files = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (name == package or name.startswith(prefix) or path.startswith(installed)):
            files.append(path)
    return sorted(set(files))


def package_dirs() -> set[str]:
    """Where installed packages live: this interpreter's site-packages (a virtualenv's),
    the system's (Debian's python3-click is in /usr/lib/python3/dist-packages, not in
    sysconfig's purelib, /usr/local/...) and the user's."""
    import site  # (loaded at start as a rule: ``-S`` aside)

    dirs = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    with contextlib.suppress(AttributeError):  # (an old virtualenv's site module)
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    return dirs


#: how long before its process began a file's change still counts as made while the
#: agent started (the start time is known to a clock tick, file times to a few)
START_SLACK_NS = 1_000_000_000


def process_started_ns() -> int | None:
    """When this process began, on the clock file times use; None without /proc."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # the fields after the command name (which may hold spaces and parentheses)
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[19])  # starttime: clock ticks after boot (field 22 of proc(5))
    since_boot_ns = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return time.time_ns() - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - since_boot_ns)


class Fingerprint:
    def __init__(self, files: Iterable[str], *, started_ns: int | None = None) -> None:
        """``started_ns``: when the process that imported ``files`` began; a file
        changed after (or just before) then may have been imported as it was before."""
        files = list(files)
        directories = sorted({os.path.dirname(path) for path in files})
        # In this order: a tree swapped in before the watch is set makes the
        # directories' identities differ (every check stats then); a file changed
        # while the stamps are taken leaves an event.
        self._directories = {d: _identity(d) for d in directories}
        self._watch = _watch(directories)
        self.stamps = {path: _stamp(path) for path in files}
        self._changed_as_started: str | None = None
        if started_ns is not None:
            self._changed_as_started = next(
                (
                    path for path, stamp in self.stamps.items()
                    if stamp is not None and stamp[3] >= started_ns - START_SLACK_NS
                ),
                None,
            )  # fmt: skip

    @property
    def watching(self) -> bool:
        """Whether inotify tells when checking is needed (else every check stats)."""
        return self._watch is not None

    def descriptors(self) -> tuple[int, ...]:
        """What a process forked to run a command should close (the watch)."""
        return () if self._watch is None else (self._watch,)

    def changed(self) -> str | None:
        """The first file that changed or vanished since the fingerprint was taken (or
        as the process that loaded it started)."""
        if self._changed_as_started is not None:
            return self._changed_as_started
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
