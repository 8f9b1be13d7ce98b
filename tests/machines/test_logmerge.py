"""``ember logs`` interleaving stdout and stderr by the time their lines arrived, on real
log files written by the monitor's writer with a clock the test moves."""

from __future__ import annotations

import io
from pathlib import Path

from ember.machines.logmerge import MergedStream, step
from ember.machines.logs import LogConfig, LogFollower, LogSnapshot, RotatingLog
from ember.machines.logtimes import LineFilter, MarksReader

S = 1_000_000_000
T0 = 1_796_036_000 * S


class Both(io.BytesIO):
    """One pipe both streams go to (``2>&1``), remembering which wrote what."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[tuple[str, bytes]] = []

    def writer(self, name: str) -> io.BytesIO:
        both = self

        class One(io.BytesIO):
            def write(self, data: bytes) -> int:  # type: ignore[override]
                both.parts.append((name, bytes(data)))
                return both.write(data)

        return One()


def _write(d: Path, timed: dict[str, list[tuple[int, bytes]]], cap: int = 1 << 20) -> None:
    """Each stream's chunks, written at their times in the order of those times."""
    now = [0]
    logs = {name: RotatingLog(d / f"{name}.log", LogConfig(cap, 3), clock=lambda: now[0]) for name in timed}
    chunks = sorted((t, i, name, data) for name, items in timed.items() for i, (t, data) in enumerate(items))
    for now[0], _, name, data in chunks:
        logs[name].write(data)
    for log in logs.values():
        log.close()


def _merged(d: Path, *, line_filter: bool = False) -> Both:
    out = Both()
    streams = []
    for name in ("stdout", "stderr"):
        path = d / f"{name}.log"
        path.touch()
        f = LineFilter(timestamps=False) if line_filter else None
        streams.append(MergedStream(LogSnapshot.take(path), MarksReader(path), out.writer(name), f))
    while step(streams):
        pass
    for s in streams:
        s.marks.close()
    return out


def test_lines_come_in_the_order_they_arrived(tmp_path: Path) -> None:
    _write(tmp_path, {
        "stdout": [(T0, b"o1\n"), (T0 + 2 * S, b"o2\no3\n"), (T0 + 5 * S, b"o4\n")],
        "stderr": [(T0 + S, b"e1\n"), (T0 + 3 * S, b"e2\n"), (T0 + 4 * S, b"e3\ne4\n")],
    })  # fmt: skip
    for line_filter in (False, True):
        out = _merged(tmp_path, line_filter=line_filter)
        assert out.getvalue() == b"o1\ne1\no2\no3\ne2\ne3\ne4\no4\n"
        # each stream's own bytes are unchanged
        for name, want in (("stdout", b"o1\no2\no3\no4\n"), ("stderr", b"e1\ne2\ne3\ne4\n")):
            assert b"".join(p for n, p in out.parts if n == name) == want


def test_runs_go_out_whole_and_stdout_first_on_a_tie(tmp_path: Path) -> None:
    many = b"".join(b"line %d\n" % i for i in range(2000))
    _write(tmp_path, {
        "stdout": [(T0, many), (T0 + 2 * S, b"tie\n")],
        "stderr": [(T0 + S, b"between\n"), (T0 + 2 * S, b"tie too\n")],
    })  # fmt: skip
    out = _merged(tmp_path)
    assert out.getvalue() == many + b"between\ntie\ntie too\n"
    # the 2000 lines that came at once went out in the pieces they were read in, not
    # line by line
    assert len([p for n, p in out.parts if n == "stdout"]) <= 3


def test_a_line_is_never_cut_by_the_other_stream(tmp_path: Path) -> None:
    """A line whose bytes arrived in several chunks, with a line of the other stream in
    between, is printed whole: a line's time is its start's."""
    _write(tmp_path, {
        "stdout": [(T0, b"start of a "), (T0 + 2 * S, b"long line\n"), (T0 + 4 * S, b"next\n")],
        "stderr": [(T0 + S, b"err\n"), (T0 + 3 * S, b"err 2\n")],
    })  # fmt: skip
    assert _merged(tmp_path).getvalue() == b"start of a long line\nerr\nerr 2\nnext\n"


def test_logs_without_marks_keep_each_stream_whole(tmp_path: Path) -> None:
    (tmp_path / "stdout.log").write_bytes(b"o1\no2\n")
    (tmp_path / "stderr.log").write_bytes(b"e1\n")
    assert _merged(tmp_path).getvalue() == b"o1\no2\ne1\n"
    # a last line without a newline is printed all the same
    (tmp_path / "stdout.log").write_bytes(b"o1\nno newline")
    assert _merged(tmp_path).getvalue() == b"o1\nno newlinee1\n"


def test_a_follower_stops_at_until_inside_a_line_the_guest_never_ends(tmp_path: Path) -> None:
    now = [T0]
    path = tmp_path / "stdout.log"
    log = RotatingLog(path, LogConfig(1 << 20, 2), clock=lambda: now[0])
    log.write(b"begun before --until ")
    out = io.BytesIO()
    stream = MergedStream(LogFollower.current(path), MarksReader(path), out, LineFilter(until=T0 + S))
    steps = 0
    for k in range(200):
        now[0] = T0 + (10 + k) * S
        log.write(b"x" * 1000)
        steps += step([stream])
    assert out.getvalue() == b"begun before --until "
    assert stream.finished and steps == 1
    stream.marks.close()
    log.close()
