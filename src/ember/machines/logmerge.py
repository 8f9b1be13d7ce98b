"""``ember logs``: a machine's stdout and stderr printed in the order their lines arrived.

The two streams are kept in separate files (``logs``), each with its time marks
(``logtimes``).  Like ``docker logs``, which reads both from one file in arrival
order, ``ember logs`` interleaves them by time: of the two next lines, the one
that arrived first goes first (stdout first on a tie), so ``ember logs 2>&1``
reads as the program wrote.  Each stream's bytes still go to its own
descriptor unchanged, apart from what ``-t``, ``--since`` and ``--until`` ask
for (``LineFilter``).

Not line by line: a stream gives the run of its lines that arrived no later
than the other stream's next line, found from its marks (a mark says when the
bytes from its offset on arrived), so a stream that had the host to itself for
a while goes out in big pieces.  A line is never split between the two: once a
stream's line has begun, it goes on until its end, or until that stream has no
more bytes for now (a follower, or a last line without a newline).  Lines
without a time (logs from before marks were kept) sort first.  With ``-f`` a
line is printed as soon as it is read: one that arrives later on the other
stream with an earlier time cannot be put back before it.
"""

from __future__ import annotations

import bisect
from typing import BinaryIO, Protocol

from ember.machines.logtimes import LineFilter, Marks, MarksReader

#: the sort key of a line whose time is not known
_UNKNOWN = -1


class _Source(Protocol):
    def read_at(self, size: int = 1 << 16) -> tuple[bytes, int, int]: ...


class MergedStream:
    """One stream of ``ember logs``: where its bytes come from and go, and what of them
    has been read and not printed yet (``buf`` from ``start`` on: the buffer is not
    copied down at each run, which made many short runs quadratic)."""

    def __init__(
        self, src: _Source, marks: MarksReader, dst: BinaryIO, line_filter: LineFilter | None
    ) -> None:
        self.src = src
        self.marks = marks
        self.dst = dst
        self.filter = line_filter  # None: the bytes as they are
        self.buf = b""
        self.start = 0  # the first byte of buf not printed yet
        self.base = 0  # buf[0]'s offset in its file
        self.at_line_start = True
        self._file_marks: Marks | None = None

    @property
    def pending(self) -> int:
        return len(self.buf) - self.start

    @property
    def finished(self) -> bool:
        """Nothing more of this stream is wanted (a line came after ``--until``)."""
        return self.filter is not None and self.filter.past_until

    def fill(self) -> None:
        if not self.pending and not self.finished:
            self.buf, fd, self.base = self.src.read_at(1 << 16)
            self.start = 0
            # read after the bytes: the writer marks before it writes, so they are dated
            self._file_marks = self.marks.marks_of(fd) if self.buf else None

    def _marks(self) -> Marks:
        assert self._file_marks is not None  # (only asked while buf holds bytes)
        return self._file_marks

    def head_time(self) -> int:
        """When the next line arrived (``_UNKNOWN`` if not known)."""
        ns = self._marks().time_at(self.base + self.start)
        return _UNKNOWN if ns is None else ns

    def run_end(self, until: int, *, ties: bool) -> int:
        """How much of what is pending (whole lines, at least one, or all of it)
        arrived before ``until`` (or at it, with ``ties``): up to the first line that
        starts at or after the first mark past that."""
        marks = self._marks()
        # the marks within the buffer only: a file's later marks are for later reads
        # (walking them all from each read made a long log quadratic)
        i = bisect.bisect_right(marks.offsets, self.base + self.start)
        j = bisect.bisect_left(marks.offsets, self.base + len(self.buf), i)
        for k in range(i, j):
            if marks.times[k] > until or (marks.times[k] == until and not ties):
                at = marks.offsets[k] - self.base
                # the line holding byte ``at`` began before it (in the run): the
                # run ends at the first line start from ``at`` on
                end = self.buf.find(b"\n", at - 1)
                return (len(self.buf) if end < 0 else end + 1) - self.start
        return self.pending

    def line_end(self) -> int:
        """How much of what is pending ends its first line (all of it if no line end)."""
        end = self.buf.find(b"\n", self.start)
        return (len(self.buf) if end < 0 else end + 1) - self.start

    def emit(self, n: int) -> None:
        data = self.buf[self.start : self.start + n]
        if self.filter is not None:
            out = self.filter.feed(data, self.base + self.start, self._marks().time_at)
        else:
            out = data
        self.start += n
        self.at_line_start = data.endswith(b"\n")
        if out:
            self.dst.write(out)
            self.dst.flush()


def step(streams: list[MergedStream]) -> bool:
    """Print the next run of lines (of the stream whose next line came first); False
    when no stream has bytes for now."""
    for s in streams:
        s.fill()
    ready = [s for s in streams if s.pending and not s.finished]
    if not ready:
        return False
    for s in ready:
        if not s.at_line_start:  # a line begun: to its end first
            s.emit(s.line_end())
            return True
    if len(ready) == 1:
        ready[0].emit(ready[0].pending)
        return True
    # (time, position): on a tie the stream listed first (stdout) goes first
    keys = sorted((s.head_time(), i) for i, s in enumerate(ready))
    (_, first), (until, second) = keys[0], keys[1]
    s = ready[first]
    s.emit(s.run_end(until, ties=first < second))
    return True
