"""Size-capped machine logs with rotation (like Docker's json-file ``max-size``/``max-file``).

The guest is hostile: whatever it prints must not fill the host's disk.  The
monitor is the only writer of ``stdout.log``, ``stderr.log`` and ``console.log``
(``RotatingLog``); a file never grows past ``max_size``: before a chunk would
make it, the file is rotated by rename (``x.log`` -> ``x.log.1`` -> ``x.log.2``
..., keeping ``max_files - 1`` old ones) and a new one is started.  So a stream
never holds more than ``max_size * max_files`` bytes on disk.

Readers that follow (``ember run`` in the foreground, ``ember logs -f``) use
``LogFollower``: it reads a file to its end, and when the name now points at
another file, it finishes the one it holds (complete by then: the writer never
writes to a file again once it is not current) and goes on with the file that
came after it, found by inode among the rotated names.  ``ember logs`` without
``-f`` reads a ``LogSnapshot``: the files as they are when it starts.

A reader that falls more than ``max_files - 1`` rotations behind would miss the
files dropped meanwhile.  The attached reader (the foreground ``ember run``,
like ``docker run`` attached) must not.  It holds a shared ``flock`` on the
file it reads (taking the next one's before letting go).  Dropping the file it
holds loses it nothing (it has the file open), but the writer keeps an fd of
such a file, and while the reader still holds it, the reader has not opened
the files after it: none of those may go.  So the writer does not rotate then:
``write`` stops short, and the monitor holds the rest back (which holds the
guest back) until the reader has moved on.  Once the guest is gone, the monitor
waits for a reader that is still behind as long as it makes progress (a file
finished within ``streams.DRAIN_WAIT_S``), and until it has opened the current
file (``files_behind``) before it lets the logs go (``--rm`` deletes them).

Each log file has its time marks beside it (``logtimes``: when its bytes
arrived, for ``ember logs -t/--since/--until``), written by the same writer
before the bytes they date, counted against the file's cap, and removed with it.

Settings, the ``"logs"`` section of ``$EMBER_HOME/config.json``::

    {"logs": {"max_size": "16M", "max_files": 2}}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.config import config_section
from ember.fsutil import write_all
from ember.home import Home
from ember.machines.errors import MachineError
from ember.machines.logtimes import MARK_SIZE, MarkWriter, remove_marks, sweep_marks
from ember.sizes import InvalidSize, parse_size

DEFAULT_MAX_SIZE = 16 << 20
DEFAULT_MAX_FILES = 2
#: below this a file cannot hold a few ordinary lines; above, a typo
MIN_MAX_SIZE = 4 << 10
MAX_MAX_SIZE = 1 << 40
MAX_MAX_FILES = 100
#: rotated names a reader looks at (more than MAX_MAX_FILES: the setting may have shrunk)
_SCAN_LIMIT = MAX_MAX_FILES + 8


class LogConfigError(MachineError):
    """The ``logs`` section of config.json is malformed."""


@dataclass(frozen=True)
class LogConfig:
    max_size: int = DEFAULT_MAX_SIZE
    max_files: int = DEFAULT_MAX_FILES

    @classmethod
    def load(cls, home: Home) -> LogConfig:
        section = config_section(home, "logs", LogConfigError) or {}
        return cls.from_dict(section, where=str(home.config_file))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config.json") -> LogConfig:
        unknown = sorted(set(d) - {"max_size", "max_files"})
        if unknown:
            raise LogConfigError(
                f"{where}: unknown setting logs.{unknown[0]} (known: max_size, max_files)"
            )
        max_size, max_files = DEFAULT_MAX_SIZE, DEFAULT_MAX_FILES
        if "max_size" in d:
            max_size = _size(d["max_size"], where)
        if "max_files" in d:
            v = d["max_files"]
            if type(v) is not int or not 1 <= v <= MAX_MAX_FILES:
                raise LogConfigError(
                    f"{where}: logs.max_files must be a whole number from 1 to "
                    f"{MAX_MAX_FILES}, not {v!r}"
                )
            max_files = v
        return cls(max_size, max_files)


def _size(value: object, where: str) -> int:
    if type(value) is int:
        n = value
    elif isinstance(value, str):
        try:
            n = parse_size(value)
        except InvalidSize:
            n = -1
    else:
        n = -1
    if n < 0:
        raise LogConfigError(
            f"{where}: logs.max_size must be a size like 16M or a number of bytes, not {value!r}"
        )
    if not MIN_MAX_SIZE <= n <= MAX_MAX_SIZE:
        raise LogConfigError(f"{where}: logs.max_size {value!r} is out of range (from 4K to 1T)")
    return n


# ---- writing ---------------------------------------------------------------------------


def fits(used: int, data: bytes, cap: int, *, fresh: bool | None = None) -> int:
    """How many leading bytes of ``data`` go into a file holding ``used`` bytes (pure).

    Everything when it fits under ``cap``; else whole lines up to the cap; 0 means
    "rotate first" (the file has data and not even one line fits); a line longer than
    a whole file is cut at the cap.  ``fresh``: the file holds no data yet (default:
    ``used == 0``; ``used`` may count more than the file's data: its time marks)."""
    room = cap - used
    if len(data) <= room:
        return len(data)
    if room > 0:
        cut = data.rfind(b"\n", 0, room) + 1
        if cut:
            return cut
    if used == 0 if fresh is None else fresh:
        return max(room, 1)
    return 0


def rotated_name(path: Path, i: int) -> Path:
    return path if i == 0 else path.with_name(f"{path.name}.{i}")


def log_files(path: Path) -> list[Path]:
    """``path``'s rotated files, oldest first, then ``path`` itself (when they exist)."""
    found = []
    misses = 0
    for i in range(1, _SCAN_LIMIT):
        p = rotated_name(path, i)
        if p.exists():
            found.append(p)
            misses = 0
        else:
            misses += 1
            if misses > 2:  # a gap of one is a rotation in progress
                break
    found.reverse()
    if path.exists():
        found.append(path)
    return found


class RotatingLog:
    """The writer of one capped log: append, rotate by rename when full; each file's
    time marks beside it (``logtimes``), counted against the cap with it."""

    def __init__(
        self, path: Path, config: LogConfig, *, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.path = path
        self.cap = config.max_size
        self.max_files = config.max_files
        self._finish_rotation(path)
        self._drop_past(path, self.max_files)
        self.fd = self._open(path, trunc=False)
        self.size = os.fstat(self.fd).st_size
        self.rotations = 0
        #: fds of dropped files an attached reader still held when they were dropped
        self._held: list[int] = []
        # marks of files gone meanwhile (a monitor killed while it rotated) go now
        kept = {ident[1] for p in log_files(path) if (ident := _stat_ident(p)) is not None}
        sweep_marks(path, kept | {os.fstat(self.fd).st_ino})
        self.marks = MarkWriter(path, self.fd, clock)

    @staticmethod
    def _drop_past(path: Path, max_files: int) -> None:
        """Rotated files numbered ``max_files`` and up: kept by a run under a higher
        ``logs.max_files``, which no rotation under this one drops (the cap would not
        hold, and ``ember logs`` would print them before this run's output).  Their
        marks go with them (the sweep after this)."""
        for p in log_files(path):
            number = p.name.removeprefix(path.name).removeprefix(".")
            if number.isdigit() and int(number) >= max_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    @classmethod
    def _finish_rotation(cls, path: Path) -> None:
        """A monitor killed between the two renames of ``rotate`` left the full file
        under the current name and under ``.1``: the next run appended to it, and
        ``ember logs`` printed up to a file's worth twice.  The current name gets its
        fresh file now, as the rotation would have given it."""
        try:
            if not os.path.samefile(path, rotated_name(path, 1)):
                return
        except FileNotFoundError:
            return
        fresh = path.with_name(f"{path.name}.new")
        os.close(cls._open(fresh, trunc=True))
        os.rename(fresh, path)

    @staticmethod
    def _open(path: Path, trunc: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        return os.open(path, flags | (os.O_TRUNC if trunc else 0), 0o640)

    def write(self, data: bytes | bytearray, *, force: bool = False) -> int:
        """Append ``data``, rotating as needed; the bytes taken.

        Fewer than ``len(data)`` when a rotation would drop a file the attached
        reader has not opened yet (unless ``force``): write the rest later."""
        done = 0
        # released on return: the caller may resize a bytearray it passed
        with memoryview(data) as view:
            while done < len(data):
                ns = self.marks.due()
                used = self.size + self.marks.size + (MARK_SIZE if ns is not None else 0)
                chunk = bytes(view[done : done + self.cap + 1])
                n = fits(used, chunk, self.cap, fresh=self.size == 0)
                if n == 0:
                    if not self.rotate(force=force):
                        break
                    continue
                if ns is not None:  # before the bytes: a reader that has them has their time
                    self.marks.mark(self.size, ns)
                write_all(self.fd, view[done : done + n])
                self.size += n
                done += n
        return done

    def dropped_by_rotation(self) -> Path:
        """The file the next rotation deletes: the oldest kept (or the current one)."""
        return rotated_name(self.path, self.max_files - 1)

    def rotate(self, *, force: bool = False) -> bool:
        """Make a fresh current file; the full one becomes ``.1`` (older ones shift up).

        The current name always exists (the new file replaces it by rename) and the
        full file keeps a name until it is the oldest past ``max_files``, so a reader
        can always find what follows the file it holds.  False (nothing done) when
        the attached reader still reads a file dropped before: the file this
        rotation drops is one it has not opened yet."""
        self._held = [fd for fd in self._held if _still_held(fd)]
        if self._held and not force:
            return False  # the attached reader has not opened the files after that one
        path = self.path
        victim = _open_existing(self.dropped_by_rotation())
        # (a second descriptor: after the renames, whether the file still has a name;
        # after a rotation cut short by a kill it may not be the one dropped)
        victim_check = os.dup(victim) if victim is not None else None
        if victim is not None and _still_held(victim):
            self._held.append(victim)  # watch it: see the module's docstring
        fresh = path.with_name(f"{path.name}.new")
        with contextlib.ExitStack() as done:
            if victim_check is not None:
                done.callback(os.close, victim_check)
            with contextlib.ExitStack() as undo:  # unless the rotation goes through
                new_fd = self._open(fresh, trunc=True)
                undo.callback(os.close, new_fd)
                # before any rename: a marks file that cannot be made fails this
                # rotation (each later write tries again), not every write after it
                new_marks = self.marks.open_for(new_fd, fresh=True)
                undo.callback(os.close, new_marks)
                if self.max_files > 1:
                    for i in range(self.max_files - 2, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(rotated_name(path, i), rotated_name(path, i + 1))
                    # a second name first, then the rename over .1: the full file is
                    # never nameless
                    tmp = path.with_name(f"{path.name}.rot")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    os.link(path, tmp)
                    os.rename(tmp, rotated_name(path, 1))
                os.rename(fresh, path)
                undo.pop_all()
            os.close(self.fd)
            self.fd, self.size = new_fd, 0
            self.marks.switch(new_marks)
            if victim_check is not None:
                st = os.fstat(victim_check)
                if st.st_nlink == 0:  # dropped: its marks go (readers that opened them keep them)
                    remove_marks(path, st.st_ino)
        self.rotations += 1
        return True

    def files_behind(self) -> int:
        """How many files before the current one the attached reader still holds (0: it
        reads the current file, or there is no attached reader).  The reader always
        takes the next file's lock before it lets go of the one it holds, so while this
        is not 0 it has not opened the current file yet: deleting the logs then (``--rm``)
        would cut it off from the files between."""
        self._held = [fd for fd in self._held if _still_held(fd)]
        behind = len(self._held)
        for i in range(1, self.max_files):
            fd = _open_existing(rotated_name(self.path, i))
            if fd is not None and _still_held(fd):
                os.close(fd)
                behind += 1
        return behind

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.marks.close()
        for fd in self._held:
            os.close(fd)
        self._held = []


class CappedFile:
    """Keeps the first ``limit`` bytes written, drops the rest (the exit report file)."""

    def __init__(self, path: Path, limit: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.limit = limit
        self.dropped = 0

    def write(self, data: bytes | bytearray, *, force: bool = False) -> int:
        keep = max(0, min(len(data), self.limit - self.size))
        if keep:
            write_all(self.fd, memoryview(data)[:keep])
            self.size += keep
        self.dropped += len(data) - keep
        return len(data)

    def files_behind(self) -> int:
        return 0  # no reader waits on it

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _still_held(fd: int) -> bool:
    """Whether an attached reader holds the file (its shared flock); closes ``fd`` if not."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    os.close(fd)  # releases the probe's lock too
    return False


# ---- reading ---------------------------------------------------------------------------


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _stat_ident(path: Path) -> tuple[int, int] | None:
    try:
        return _ident(os.stat(path))
    except FileNotFoundError:
        return None


class LogFollower:
    """Reads one capped log as a single stream across rotations."""

    def __init__(self, path: Path, fd: int, *, hold: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.hold = hold
        self.ident = _ident(os.fstat(fd))
        if hold:
            fcntl.flock(fd, fcntl.LOCK_SH)

    @classmethod
    def current(cls, path: Path, *, hold: bool = False, at_end: bool = False) -> LogFollower:
        """From the start of the current file (``ember run``: opened before the VM writes),
        or from its end (``ember start -a``: what a new run of the machine writes).

        ``hold``: the attached reader; the writer waits for it rather than drop a
        file it has not read (see the module's docstring)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if at_end:
            os.lseek(fd, 0, os.SEEK_END)
        return cls(path, fd, hold=hold)

    @classmethod
    def oldest(cls, path: Path) -> LogFollower:
        """From the oldest file still kept (``ember logs``).  With none (a machine whose
        ``ember run`` was killed before its logs were made, one being removed): an
        empty stand-in, followed by the log once one appears (``_successor``)."""
        for p in log_files(path):
            try:
                return cls(path, os.open(p, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                continue  # rotated away or dropped while we looked
        try:
            return cls.current(path)
        except FileNotFoundError:
            return cls(path, os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))

    def end_mark(self) -> tuple[tuple[int, int], int] | None:
        """Where the stream ends now (the current file and its size), for ``read(until=)``:
        what a run wrote, without what the next run of the machine appends."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return _ident(st), st.st_size

    def read(
        self, size: int = 1 << 16, *, until: tuple[tuple[int, int], int] | None = None
    ) -> bytes:
        """The next bytes of the stream; ``b""`` when the writer has written nothing more
        (or, with ``until``, once the stream reached that ``end_mark``)."""
        return self.read_at(size, until=until)[0]

    def read_at(
        self, size: int = 1 << 16, *, until: tuple[tuple[int, int], int] | None = None
    ) -> tuple[bytes, int, int]:
        """``read``, and where the bytes are: the descriptor of their file (open until
        the next read) and their offset in it."""
        while True:
            pos = os.lseek(self.fd, 0, os.SEEK_CUR)
            if until is not None and self.ident == until[0]:
                size = min(size, until[1] - pos)
                if size <= 0:
                    return b"", self.fd, pos
            data = os.read(self.fd, size)
            if data:
                return data, self.fd, pos
            nxt = self._successor()
            if nxt is None:
                return b"", self.fd, pos
            # the file we hold is complete now that another one follows it: finish it
            data = os.read(self.fd, size)
            if data:
                os.close(nxt)
                return data, self.fd, pos
            if self.hold:
                fcntl.flock(nxt, fcntl.LOCK_SH)  # the next file before letting go of this one
            os.close(self.fd)
            self.fd, self.ident = nxt, _ident(os.fstat(nxt))

    def _successor(self) -> int | None:
        """An open fd of the file written after ours, or None while ours is current."""
        for _ in range(20):  # a rotation moves names under us: look again
            current = _stat_ident(self.path)
            if current is None or current == self.ident:
                return None  # still current (or the machine is gone)
            pos = self._position()
            if pos is None:
                # ours was dropped as the oldest (max_files 1, or we fell behind):
                # the oldest file still kept is the closest to what we missed
                files = log_files(self.path)
                if not files:
                    return None
                fd = _open_existing(files[0])
            else:
                fd = _open_existing(rotated_name(self.path, pos - 1))
            if fd is None:
                continue
            ident = _ident(os.fstat(fd))
            # names only move from newer to older, ours first: if ours has not moved
            # since, the file we opened was its successor when we opened it
            if ident != self.ident and (
                pos is None or _stat_ident(rotated_name(self.path, pos)) == self.ident
            ):
                return fd
            os.close(fd)
        return None

    def _position(self) -> int | None:
        misses = 0
        for i in range(1, _SCAN_LIMIT):
            ident = _stat_ident(rotated_name(self.path, i))
            if ident == self.ident:
                return i
            misses = misses + 1 if ident is None else 0
            if misses > 2:
                break
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LogFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: how often ``LogSnapshot.take`` looks again when a rotation came while it opened files
_SNAPSHOT_TRIES = 20


class LogSnapshot:
    """One capped log as it is now, for ``ember logs`` without ``-f`` (``docker logs``
    prints what there is when it starts): its files, oldest first, each read up to the
    size it had when taken.  They are all opened at once, so rotations and drops after
    that take nothing away, and what the guest writes after it is not read: a reader
    slower than the guest ends all the same."""

    def __init__(self, parts: list[tuple[int, int]]) -> None:
        #: (fd, bytes left to read) per file, oldest first
        self._parts = parts

    @classmethod
    def take(cls, path: Path) -> LogSnapshot:
        """Open ``path``'s files as one consistent set: no rotation ended while they were
        opened.  The current file is opened first and its name still points at it
        after the others are (its fd is held, so its inode cannot be a newer file's by
        then: inode numbers are reused).  Within one rotation names only move towards
        older ones while they are opened newest first, so none is missed, and a file
        seen twice is taken once.  After ``_SNAPSHOT_TRIES`` rotations in a row, the
        last set is taken as it is."""
        fds: list[int] = []
        for _ in range(_SNAPSHOT_TRIES):
            fds = _open_newest_first(path)
            if not fds or _stat_ident(path) == _ident(os.fstat(fds[0])):
                break
            for fd in fds:
                os.close(fd)
            fds = []
        fds = fds or _open_newest_first(path)
        fds.reverse()
        return cls([(fd, os.fstat(fd).st_size) for fd in fds])

    def keep_last_lines(self, n: int) -> None:
        """Read only the last ``n`` lines of the log as taken (``ember logs --tail``)."""
        part, offset = _tail_start(self._parts, n)
        for fd, _ in self._parts[:part]:
            os.close(fd)
        self._parts = self._parts[part:]
        if self._parts:
            fd, size = self._parts[0]
            os.lseek(fd, offset, os.SEEK_SET)
            self._parts[0] = (fd, size - offset)

    def follower(self, path: Path) -> LogFollower:
        """A follower of ``path`` from where this snapshot's reading starts, on through
        what the writer adds after it (``ember logs -f --tail``); closes the snapshot."""
        if not self._parts:
            return LogFollower.oldest(path)
        fd = self._parts[0][0]
        for other, _ in self._parts[1:]:
            os.close(other)
        self._parts = []
        return LogFollower(path, fd)

    def read(self, size: int = 1 << 16) -> bytes:
        """The next bytes of the log as it was taken; ``b""`` at its end."""
        return self.read_at(size)[0]

    def fds(self) -> list[int]:
        """The descriptors of the files still to be read, oldest first."""
        return [fd for fd, _ in self._parts]

    def read_at(self, size: int = 1 << 16) -> tuple[bytes, int, int]:
        """``read``, and where the bytes are: the descriptor of their file (open until
        the next read) and their offset in it; (b"", -1, 0) at the end."""
        while self._parts:
            fd, left = self._parts[0]
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            data = os.read(fd, min(size, left)) if left > 0 else b""
            if data:
                self._parts[0] = (fd, left - len(data))
                return data, fd, pos
            os.close(fd)
            self._parts.pop(0)
        return b"", -1, 0

    def close(self) -> None:
        for fd, _ in self._parts:
            os.close(fd)
        self._parts = []

    def __enter__(self) -> LogSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tail_start(parts: list[tuple[int, int]], n: int) -> tuple[int, int]:
    """Where the last ``n`` lines of the files ``parts`` (fd, size; oldest first, read
    as one stream) begin: (index of the part, offset in it).  A newline that ends the
    stream ends its last line; a last line without one counts as a line."""
    if not parts:
        return 0, 0
    if n <= 0:
        return len(parts) - 1, parts[-1][1]
    seen, last_byte = 0, True
    for i in range(len(parts) - 1, -1, -1):
        fd, end = parts[i]
        while end > 0:
            start = max(0, end - (1 << 16))
            chunk = os.pread(fd, end - start, start)
            pos = len(chunk)
            if last_byte:
                last_byte = False
                if chunk.endswith(b"\n"):
                    pos -= 1
            while (k := chunk.rfind(b"\n", 0, pos)) >= 0:
                seen += 1
                if seen == n:
                    return i, start + k + 1
                pos = k
            end = start
    return 0, 0


def _open_newest_first(path: Path) -> list[int]:
    """Open fds of ``path`` (first) and its rotated files, newest first, each file once."""
    fds: list[int] = []
    seen: set[tuple[int, int]] = set()
    misses = 0
    for i in range(_SCAN_LIMIT):
        fd = _open_existing(rotated_name(path, i))
        if fd is None:
            if i:
                misses += 1
                if misses > 2:  # (as log_files: a gap of one is a rotation under way)
                    break
            continue
        misses = 0
        ident = _ident(os.fstat(fd))
        if ident in seen:
            os.close(fd)
            continue
        seen.add(ident)
        fds.append(fd)
    return fds


def _open_existing(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
