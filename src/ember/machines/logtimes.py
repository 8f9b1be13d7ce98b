"""When each line of a machine's log arrived: time marks beside the capped logs.

The logs stay the guest's raw bytes (what ``ember run`` attached and ``ember logs``
print as they are).  Beside each log file the monitor keeps a *marks* file, a
list of 16-byte records ``(offset, unix time in ns)``: "the bytes from this
offset on arrived at this time".  The monitor appends a mark before the chunk of
output it is about to write, at most one per ``MIN_GAP_NS``, so a line's time is
that of the chunk it began in, within a millisecond (a line that starts while
the last mark is younger than that gets that mark's time).

A marks file is named after the inode of its log file
(``.stdout.log.times.<inode>``), not after the log's name: rotation renames the
log files, and a reader that holds a log file open finds its marks by the inode
it holds, whatever name the file has by then.  The writer removes a marks file
with its log file and sweeps the ones whose log file is gone (a monitor killed
between the two).  Marks count against the log's cap (``RotatingLog``), so a
guest printing one byte at a time cannot grow them past it.

Logs written before ember kept marks have none: their lines have no time
(``LineFilter`` prints them without one, and leaves them out when a window of
time is asked for).

Pure logic (``Marks``, ``LineFilter``, ``parse_when``, ``format_time``) is kept
apart from the file handling (``MarkWriter``, ``MarksReader``).
"""

from __future__ import annotations

import array
import bisect
import contextlib
import datetime as dt
import errno
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

from ember.durations import MAX_LENGTH, parse_duration_ns

#: one mark: offset in the log file, unix time in nanoseconds (little-endian)
MARK = struct.Struct("<QQ")
MARK_SIZE = MARK.size
#: a new mark only when the last one is at least this old
MIN_GAP_NS = 1_000_000
_PREFIX = ".times."
_MAX_MARKS_READ = 1 << 20  # bytes of marks read at once


def marks_path(log: Path, inode: int) -> Path:
    """The marks file of the log file ``log`` names (whichever rotated name it has now)
    when its inode is ``inode``."""
    return log.with_name(f"{_marks_prefix(log)}{inode}")


def _marks_prefix(log: Path) -> str:
    """What the names of the marks files of ``log``'s stream begin with."""
    return f".{log.name}{_PREFIX}"


# ---- pure ----------------------------------------------------------------------------


class Marks:
    """The marks of one log file, in the order written (offsets never go down).  In
    arrays: a guest printing a byte a millisecond gives a 16 MiB file a million."""

    def __init__(self) -> None:
        self.offsets = array.array("Q")
        self.times = array.array("Q")

    def add_records(self, data: bytes) -> None:
        """Append whole records from ``data`` (a multiple of MARK_SIZE); a record whose
        offset goes backwards is ignored (the file is damaged, not trusted for order)."""
        for offset, ns in MARK.iter_unpack(data):
            if self.offsets and offset < self.offsets[-1]:
                continue
            self.offsets.append(offset)
            self.times.append(ns)

    def time_at(self, offset: int) -> int | None:
        """When the byte at ``offset`` arrived (ns), or None if no mark covers it."""
        i = bisect.bisect_right(self.offsets, offset) - 1
        return self.times[i] if i >= 0 else None


def format_time(ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds, as ``docker logs -t`` prints."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


class InvalidTime(ValueError):
    """A --since/--until value that is none of the accepted forms."""


_UNIX = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_FRACTION = re.compile(r"(?<=[0-9]{2}:[0-9]{2}:[0-9]{2})[.,]([0-9]+)")


def parse_when(text: str, now_ns: int) -> int:
    """A point in time (unix ns) from what ``docker logs --since/--until`` takes: a
    duration back from now (``10m``, ``1h30m``, ``1.5h``, ``90s``, ``2d``), a unix time in
    seconds (``1796036000``, ``1796036000.5``), or an RFC 3339 date or time
    (``2026-11-30``, ``2026-11-30T12:00:00Z``, ``...+01:00``; without a zone: local
    time, as Docker takes it)."""
    s = text.strip()
    if not s or len(s) > MAX_LENGTH:
        raise InvalidTime(text)
    if (back := parse_duration_ns(s)) is not None:
        return now_ns - back
    if _UNIX.fullmatch(s):
        whole, _, frac = s.partition(".")
        return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    # the fraction apart: datetime keeps microseconds, and a time -t printed (nanoseconds)
    # given back to --until must include its own line
    fraction_ns = 0
    if m := _FRACTION.search(s):
        if len(m.group(1)) > 9:
            raise InvalidTime(text)
        fraction_ns = int((m.group(1) + "00000000")[:9])
        s = s[: m.start()] + s[m.end() :]
    try:
        when = dt.datetime.fromisoformat(s.replace("z", "Z"))
        if when.tzinfo is None:
            when = when.astimezone()  # local time, as Docker reads a time without a zone
        delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    except (ValueError, OverflowError):  # (also a date at the ends of the calendar)
        raise InvalidTime(text) from None
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + fraction_ns


class LineFilter:
    """Turns one stream's bytes into ``ember logs`` output: each line prefixed with its
    time (``timestamps``), lines outside ``[since, until]`` left out.

    Fed chunks in order, each with the offset of its first byte in its file and that
    file's marks; a line split across chunks is decided once, at its start (also a
    line longer than a whole file, which the writer cuts at the cap and goes on
    with in the next file).  ``past_until``: a line, or the rest of one, that
    arrived after ``until`` came, so everything later did too: the stream is done."""

    def __init__(
        self, *, timestamps: bool = False, since: int | None = None, until: int | None = None
    ) -> None:
        self.timestamps = timestamps
        self.since = since
        self.until = until
        self.past_until = False
        self._at_line_start = True
        self._keep = True

    def _decide(self, ns: int | None) -> None:
        if ns is None:
            # no time known (logs from before marks were kept): in no window
            self._keep = self.since is None and self.until is None
            return
        if self.until is not None and ns > self.until:
            self.past_until = True
        self._keep = (self.since is None or ns >= self.since) and not self.past_until

    def feed(self, data: bytes, offset: int, time_at: Callable[[int], int | None]) -> bytes:
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            if self._at_line_start:
                ns = time_at(offset + pos)
                self._decide(ns)
                if self._keep and self.timestamps and ns is not None:
                    out.append(format_time(ns).encode() + b" ")
            end = data.find(b"\n", pos)
            stop = len(data) if end < 0 else end + 1
            if self._keep and self.until is not None:
                # bytes of a line begun in the window that came after ``until`` end the
                # stream there (a line a guest never ends kept a follower going)
                late = _first_later(time_at, offset, pos, stop, self.until)
                if late < stop:
                    out.append(data[pos:late])
                    self.past_until, self._keep = True, False
            if self._keep:
                out.append(data[pos:stop])
            self._at_line_start = end >= 0
            pos = stop
        return b"".join(out)


def _first_later(
    time_at: Callable[[int], int | None], offset: int, start: int, stop: int, until: int
) -> int:
    """The first position in ``[start, stop)`` whose byte came after ``until`` (``stop``
    if none), found by halving: arrival times only grow along a file."""

    def late(i: int) -> bool:
        ns = time_at(offset + i)
        return ns is not None and ns > until

    if stop <= start or not late(stop - 1):
        return stop
    lo, hi = start, stop - 1  # late(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if late(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---- files ---------------------------------------------------------------------------


class MarkWriter:
    """The monitor's side: the marks of the log file it writes now."""

    def __init__(self, log: Path, log_fd: int, clock: Callable[[], int] = time.time_ns) -> None:
        self.log = log
        self.clock = clock
        self.fd = -1
        self.size = 0
        self._last = 0
        # an empty log file has nothing to date: marks under its inode are a dropped file's
        self.switch(self.open_for(log_fd, fresh=os.fstat(log_fd).st_size == 0))

    def open_for(self, log_fd: int, *, fresh: bool) -> int:
        """Open the marks file of the log file ``log_fd``: emptied for a ``fresh`` one
        (what is there is a dropped file's whose inode it got), else kept to append to
        (the file a restarted machine goes on with).  Raises OSError; nothing changes
        then, so a rotation that cannot make it is not half done."""
        path = marks_path(self.log, os.fstat(log_fd).st_ino)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        return os.open(path, flags, 0o640)

    def switch(self, marks_fd: int) -> None:
        """Mark from now on into ``marks_fd`` (from ``open_for``)."""
        self.close()
        self.fd = marks_fd
        # a record cut short (a full disk) would shift every later one: start after it
        self.size = os.fstat(self.fd).st_size
        if self.size % MARK_SIZE:
            self.size -= self.size % MARK_SIZE
            os.ftruncate(self.fd, self.size)
        self._last = 0

    def due(self) -> int | None:
        """The time for a mark before the next write, or None if the last one is recent."""
        now = self.clock()
        return now if now - self._last >= MIN_GAP_NS or now < self._last else None

    def mark(self, offset: int, ns: int) -> None:
        record = MARK.pack(offset, ns)
        if os.write(self.fd, record) != MARK_SIZE:  # (a full disk) cut it off again
            os.ftruncate(self.fd, self.size)
            raise OSError(errno.ENOSPC, "no space left for the log's time marks")
        self.size += MARK_SIZE
        self._last = ns

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_marks(log: Path, inode: int) -> None:
    """Remove the marks of the log file whose inode is ``inode`` (it was dropped); a
    failure is left to the sweep at the writer's next start."""
    with contextlib.suppress(OSError):
        os.unlink(marks_path(log, inode))


def sweep_marks(log: Path, keep: set[int]) -> None:
    """Remove marks files of ``log``'s stream whose log file is gone (inodes not in ``keep``)."""
    prefix = _marks_prefix(log)
    try:
        names = os.listdir(log.parent)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(prefix):
            inode = name[len(prefix):]
            if not (inode.isdigit() and int(inode) in keep):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(log.parent / name)


class _MarksFile:
    """One log file's marks as a reader holds them."""

    def __init__(self, log_fd: int, marks_fd: int) -> None:
        #: a duplicate of the log file's descriptor: while it is open the inode cannot
        #: be another file's, so the cache below cannot mistake one file for another
        self.log_fd = os.dup(log_fd)
        self.marks_fd = marks_fd
        self.marks = Marks()
        self.read_to = 0

    def refresh(self) -> None:
        """Take in whole records appended since (a damaged file may end in a part)."""
        if self.marks_fd < 0:
            return
        while data := os.pread(self.marks_fd, _MAX_MARKS_READ, self.read_to):
            whole = len(data) - len(data) % MARK_SIZE
            self.marks.add_records(data[:whole])
            self.read_to += whole
            if whole < _MAX_MARKS_READ:
                break

    def close(self) -> None:
        os.close(self.log_fd)
        if self.marks_fd >= 0:
            os.close(self.marks_fd)


class MarksReader:
    """A reader's side: the marks of whichever log files of one stream it reads, found by
    the inode of the file it holds, read again as the writer appends."""

    #: files whose marks are kept at once (a reader reads one file after the other)
    KEEP = 4

    def __init__(self, log: Path) -> None:
        self.log = log
        self._files: dict[int, _MarksFile] = {}  # by inode, most recently used last
        self._held: set[int] = set()  # inodes whose marks stay open (``hold``)

    def hold(self, log_fds: list[int]) -> None:
        """Open the marks of these log files now, and keep them: a snapshot's files,
        which rotations may drop (and their marks with them) before they are read."""
        for fd in log_fds:
            self._entry(fd)
            self._held.add(os.fstat(fd).st_ino)

    def marks_of(self, log_fd: int) -> Marks:
        """The marks of the log file open as ``log_fd``, with what was appended since."""
        found = self._entry(log_fd)
        found.refresh()
        return found.marks

    def _entry(self, log_fd: int) -> _MarksFile:
        inode = os.fstat(log_fd).st_ino
        found = self._files.pop(inode, None)
        if found is None:
            try:
                marks_fd = os.open(marks_path(self.log, inode), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                marks_fd = -1  # from before marks were kept, or dropped meanwhile
            found = _MarksFile(log_fd, marks_fd)
            spare = [i for i in self._files if i not in self._held]
            while len(spare) >= self.KEEP:
                self._files.pop(spare.pop(0)).close()
        self._files[inode] = found
        return found

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
