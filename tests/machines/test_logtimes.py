"""Time marks beside the capped logs: the pure parts, then the writer and reader on real files."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from pathlib import Path

import pytest

from ember.machines.logs import LogConfig, LogSnapshot, RotatingLog, log_files
from ember.machines.logtimes import (
    MARK,
    MARK_SIZE,
    MIN_GAP_NS,
    InvalidTime,
    LineFilter,
    Marks,
    MarksReader,
    format_time,
    marks_path,
    parse_when,
)

S = 1_000_000_000
T0 = 1_796_036_000 * S  # 2026-11-30T10:53:20Z


class Clock:
    """A clock the test moves: each call returns the current time."""

    def __init__(self, ns: int = T0) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


# ---- pure ----------------------------------------------------------------------------


def test_marks_give_the_time_of_the_chunk_a_byte_arrived_in() -> None:
    marks = Marks()
    marks.add_records(MARK.pack(0, T0) + MARK.pack(10, T0 + S) + MARK.pack(25, T0 + 2 * S))
    assert [marks.time_at(o) for o in (0, 9, 10, 24, 25, 10**9)] == [
        T0, T0, T0 + S, T0 + S, T0 + 2 * S, T0 + 2 * S,
    ]  # fmt: skip
    assert Marks().time_at(0) is None
    later = Marks()
    later.add_records(MARK.pack(5, T0))
    assert later.time_at(4) is None  # before the first mark: unknown
    # a record going back (a damaged file) does not reorder what is known
    marks.add_records(MARK.pack(3, T0 + 9 * S))
    assert marks.time_at(3) == T0


def test_times_print_as_docker_logs_t_does() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000000000Z"
    assert format_time(T0 + 123_456_789) == "2026-11-30T10:53:20.123456789Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", T0 - 600 * S),
        ("1h30m", T0 - 5400 * S),
        ("1.5h", T0 - 5400 * S),
        ("90s", T0 - 90 * S),
        ("250ms", T0 - 250_000_000),
        ("0s", T0),
        ("1796036000", T0),
        ("1796036000.5", T0 + S // 2),
        ("2026-11-30T10:53:20Z", T0),
        ("2026-11-30T10:53:20.25Z", T0 + S // 4),
        ("2026-11-30T11:53:20+01:00", T0),
        ("2026-11-30t10:53:20z", T0),
    ],
)
def test_since_and_until_take_what_docker_takes(text: str, expected: int) -> None:
    assert parse_when(text, T0) == expected


def test_a_time_printed_by_t_reads_back_to_the_nanosecond() -> None:
    """datetime keeps microseconds: --until with the time -t printed for a line left
    that very line out."""
    for ns in (T0 + 123_456_789, T0 + 999_999_999, T0 + 1):
        assert parse_when(format_time(ns), 0) == ns
    assert parse_when("2026-11-30T10:53:20,5Z", 0) == T0 + S // 2
    with pytest.raises(InvalidTime):
        parse_when("2026-11-30T10:53:20.1234567890Z", 0)  # more than nanoseconds


def test_a_date_or_time_without_a_zone_is_local_time() -> None:
    local = dt.datetime(2026, 11, 30, 9, 0).astimezone()
    assert parse_when("2026-11-30T09:00:00", T0) == int(local.timestamp()) * S
    assert parse_when("2026-11-30", T0) == int(dt.datetime(2026, 11, 30).astimezone().timestamp()) * S


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "10x", "-5m", "1h30", "m", "10m ago", "1" * 80, "2026-13-01",
     "0001-01-01", "１０m"],
)  # fmt: skip
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(InvalidTime):
        parse_when(text, T0)


def _times(*pairs: tuple[int, int]) -> Marks:
    marks = Marks()
    marks.add_records(b"".join(MARK.pack(o, t) for o, t in pairs))
    return marks


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Tokyo", "UTC"])
def test_the_ends_of_the_calendar_are_an_error_in_any_zone(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local times at year 1 or 9999 overflow when taken to UTC: a traceback."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for text in ("0001-01-01", "0001-01-01T00:30:00", "9999-12-31T23:59:59"):
            with contextlib.suppress(InvalidTime):  # a value or this error, nothing else
                parse_when(text, T0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_each_line_gets_the_time_of_its_start_across_chunks() -> None:
    data = b"one\ntwo\nthree\n"
    marks = _times((0, T0), (8, T0 + S))  # "three" came a second later
    f = LineFilter(timestamps=True)
    # fed in awkward pieces: a line split across reads is prefixed once, at its start
    out = b"".join(f.feed(data[a:b], a, marks.time_at) for a, b in ((0, 2), (2, 9), (9, 14)))
    assert out == (
        b"2026-11-30T10:53:20.000000000Z one\n"
        b"2026-11-30T10:53:20.000000000Z two\n"
        b"2026-11-30T10:53:21.000000000Z three\n"
    )


def test_since_and_until_keep_the_lines_of_the_window() -> None:
    data = b"a\nb\nc\nd"  # the last line has no newline yet
    marks = _times((0, T0), (2, T0 + S), (4, T0 + 2 * S), (6, T0 + 3 * S))
    f = LineFilter(since=T0 + S, until=T0 + 2 * S)
    assert f.feed(data, 0, marks.time_at) == b"b\nc\n"
    g = LineFilter(since=T0 + 2 * S)
    assert g.feed(data, 0, marks.time_at) == b"c\nd"
    # a continued line follows its start's fate
    assert g.feed(b" more\n", 7, marks.time_at) == b" more\n"


def test_lines_without_a_time_are_printed_bare_and_in_no_window() -> None:
    unknown = Marks()  # logs written before marks were kept
    assert LineFilter(timestamps=True).feed(b"x\ny\n", 0, unknown.time_at) == b"x\ny\n"
    assert LineFilter(since=0).feed(b"x\ny\n", 0, unknown.time_at) == b""
    assert LineFilter(until=T0).feed(b"x\n", 0, unknown.time_at) == b""


# ---- files ---------------------------------------------------------------------------


def _records(path: Path) -> list[tuple[int, int]]:
    return list(MARK.iter_unpack(path.read_bytes()))


def test_the_writer_marks_before_the_bytes_at_most_once_a_millisecond(tmp_path: Path) -> None:
    path, clock = tmp_path / "stdout.log", Clock()
    log = RotatingLog(path, LogConfig(1 << 20, 2), clock=clock)
    log.write(b"first\n")
    clock.ns += MIN_GAP_NS // 2
    log.write(b"soon after\n")  # within the gap: dated with the mark before
    clock.ns += MIN_GAP_NS
    log.write(b"later\n")
    marks = marks_path(path, path.stat().st_ino)
    assert _records(marks) == [(0, T0), (17, T0 + 3 * MIN_GAP_NS // 2)]
    log.close()
    # the machine started again: the same file goes on, and so do its marks
    clock.ns += S
    log = RotatingLog(path, LogConfig(1 << 20, 2), clock=clock)
    log.write(b"again\n")
    log.close()
    assert _records(marks)[-1] == (23, clock.ns)
    assert path.read_bytes() == b"first\nsoon after\nlater\nagain\n"


def test_marks_go_with_their_file_and_leftovers_are_swept(tmp_path: Path) -> None:
    path, clock = tmp_path / "stderr.log", Clock()
    stray = marks_path(path, 999_999_999)  # a monitor killed between a drop and its marks'
    stray.write_bytes(MARK.pack(0, 0))
    other = marks_path(tmp_path / "stdout.log", 999_999_999)  # another stream's: not ours
    other.write_bytes(b"")
    log = RotatingLog(path, LogConfig(4096, 2), clock=clock)
    assert not stray.exists() and other.exists()
    for i in range(300):
        clock.ns += S
        log.write(b"line %04d %s\n" % (i, b"z" * 40))
    log.close()
    kept = log_files(path)
    assert len(kept) == 2
    marks = sorted(p.name for p in tmp_path.glob(".stderr.log.times.*"))
    assert marks == sorted(marks_path(path, p.stat().st_ino).name for p in kept)


def test_a_guest_printing_a_byte_at_a_time_stays_under_the_cap(tmp_path: Path) -> None:
    """Each byte in its own chunk, each chunk more than a millisecond apart: a mark per
    byte, 16 times the log's own size, were it not counted against the cap."""
    path, clock = tmp_path / "stdout.log", Clock()
    cap, files = 4096, 3
    log = RotatingLog(path, LogConfig(cap, files), clock=clock)
    for i in range(20_000):
        clock.ns += 2 * MIN_GAP_NS
        log.write(b"\n" if i % 50 == 49 else b"x")
    log.close()
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk <= cap * files
    for p in log_files(path):
        assert p.stat().st_size + marks_path(path, p.stat().st_ino).stat().st_size <= cap


def test_a_reader_finds_marks_written_after_it_started_and_of_dropped_files(tmp_path: Path) -> None:
    path, clock = tmp_path / "stdout.log", Clock()
    log = RotatingLog(path, LogConfig(4096, 2), clock=clock)
    log.write(b"early\n")
    snapshot = LogSnapshot.take(path)
    reader = MarksReader(path)
    data, fd, offset = snapshot.read_at()
    assert (data, offset) == (b"early\n", 0)
    assert reader.marks_of(fd).time_at(0) == T0
    # the file is dropped by rotations (max_files 2): its marks go with it, but the
    # reader that holds the file still has its marks
    clock.ns += S
    for _ in range(3):
        log.write(b"y" * 3000 + b"\n")
    assert not marks_path(path, os.fstat(fd).st_ino).exists()
    assert reader.marks_of(fd).time_at(5) == T0
    # a file a reader follows: marks appended later are read again
    cur = os.open(path, os.O_RDONLY)
    n = os.fstat(cur).st_size
    clock.ns += S
    log.write(b"new\n")
    assert reader.marks_of(cur).time_at(n) == clock.ns
    os.close(cur)
    reader.close()
    snapshot.close()
    log.close()


def test_a_damaged_marks_file_is_read_up_to_its_last_whole_record(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    path.write_bytes(b"abc\n")
    marks_path(path, path.stat().st_ino).write_bytes(MARK.pack(0, T0) + b"\x01\x02\x03")
    reader = MarksReader(path)
    fd = os.open(path, os.O_RDONLY)
    assert list(reader.marks_of(fd).offsets) == [0]
    os.close(fd)
    reader.close()
    # and the writer starts after the whole records, so later ones are not shifted
    log = RotatingLog(path, LogConfig(4096, 2), clock=Clock(T0 + S))
    log.write(b"d\n")
    log.close()
    assert _records(marks_path(path, path.stat().st_ino)) == [(0, T0), (4, T0 + S)]
    assert marks_path(path, path.stat().st_ino).stat().st_size == 2 * MARK_SIZE


def test_a_snapshot_keeps_the_times_of_files_dropped_while_it_reads(tmp_path: Path) -> None:
    """`ember logs -t busy | less`: the guest goes on, rotations drop files the snapshot
    holds (and, with them, their marks): their lines came out without times."""
    path, clock = tmp_path / "stdout.log", Clock()
    log = RotatingLog(path, LogConfig(4096, 2), clock=clock)
    for i in range(300):
        clock.ns += 2 * MIN_GAP_NS
        log.write(b"early %04d\n" % i)
    snapshot, reader, f = LogSnapshot.take(path), MarksReader(path), LineFilter(timestamps=True)
    reader.hold(snapshot.fds())
    out, first = b"", True
    while (got := snapshot.read_at(64))[0]:
        data, fd, offset = got
        out += f.feed(data, offset, reader.marks_of(fd).time_at)
        if first:  # a slow reader: two rotations meanwhile
            first = False
            for i in range(400):
                clock.ns += 2 * MIN_GAP_NS
                log.write(b"later %04d\n" % i)
    lines = out.splitlines()
    assert lines and all(line[:4] == b"2026" for line in lines), [x for x in lines if x[:4] != b"2026"][:3]
    reader.close()
    log.close()


def test_a_rotation_after_one_cut_short_keeps_the_marks_of_what_it_keeps(tmp_path: Path) -> None:
    """A monitor killed between rotate's renames (.1 moved to .2, no .1 yet): the next
    rotation kept .2 (no .1 to move over it) but removed its marks as if dropped."""
    path, clock = tmp_path / "stdout.log", Clock()
    log = RotatingLog(path, LogConfig(4096, 3), clock=clock)
    for _ in range(2):
        clock.ns += S
        log.write(b"x" * 100 + b"\n")
        log.rotate()
    log.close()
    os.rename(tmp_path / "stdout.log.1", tmp_path / "stdout.log.2")  # killed after the first rename
    log = RotatingLog(path, LogConfig(4096, 3), clock=clock)
    clock.ns += S
    log.write(b"y\n")
    log.rotate()
    log.close()
    kept = tmp_path / "stdout.log.2"
    assert kept.exists() and marks_path(path, kept.stat().st_ino).exists()


def test_a_marks_file_that_cannot_be_made_fails_one_rotation_not_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC when a rotation made the new file's marks: the writer had already let go
    of the old ones, and every later write failed (EBADF) until the monitor restarted."""
    path, clock = tmp_path / "stdout.log", Clock()
    log = RotatingLog(path, LogConfig(4096, 2), clock=clock)
    real_open, fail = os.open, [True]

    def flaky_open(p: object, *a: object, **kw: object) -> int:
        if fail[0] and ".times." in str(p):
            fail[0] = False
            raise OSError(28, "No space left on device")
        return real_open(p, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", flaky_open)
    errors = 0
    for i in range(1000):
        clock.ns += 2 * MIN_GAP_NS
        try:
            log.write(b"line %04d\n" % i)
        except OSError:
            errors += 1
    monkeypatch.undo()
    log.close()
    assert errors == 1
    # a fresh file whose inode a dropped one had: its marks start empty
    for p in log_files(path):
        marks = _records(marks_path(path, p.stat().st_ino))
        assert marks and marks[0][0] == 0 and all(o < p.stat().st_size for o, _ in marks)


def test_marks_left_under_the_inode_of_an_empty_log_are_not_its_own(tmp_path: Path) -> None:
    """A dropped file's marks a kill left behind, under the inode the new empty file got:
    appended to, their larger offsets hid the new file's marks (wrong times)."""
    path, clock = tmp_path / "stdout.log", Clock()
    path.touch()
    marks_path(path, path.stat().st_ino).write_bytes(MARK.pack(5000, 1) + MARK.pack(9000, 2))
    log = RotatingLog(path, LogConfig(1 << 20, 2), clock=clock)
    log.write(b"fresh\n")
    log.close()
    assert _records(marks_path(path, path.stat().st_ino)) == [(0, T0)]


def test_the_rest_of_a_line_that_came_after_until_ends_the_stream() -> None:
    """A line begun before --until that the guest never ends (`yes | tr -d '\\n'`): its
    later bytes were printed, and kept `-f --until` following for ever."""
    marks = _times((0, T0), (21, T0 + 10 * S))
    f = LineFilter(until=T0 + S)
    assert f.feed(b"begun before --until ", 0, marks.time_at) == b"begun before --until "
    assert not f.past_until
    assert f.feed(b"x" * 1000, 21, marks.time_at) == b""
    assert f.past_until
    assert f.feed(b"\nnext line\n", 1021, marks.time_at) == b""
