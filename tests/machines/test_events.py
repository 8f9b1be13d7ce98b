"""The monitor's events as the CLI reads them (ember.machines.events), over real pipes."""

from __future__ import annotations

import json
import os
import threading

import pytest

from ember.machines.errors import MachineError
from ember.machines.events import (
    EventReader,
    EventWriter,
    Exited,
    MonitorFailed,
    Started,
    decode,
    encode,
)


def test_what_the_monitor_writes_is_what_the_cli_reads() -> None:
    r, w = os.pipe()
    writer = EventWriter(w)
    writer.send_started(1234)
    writer.send_started(1234)  # said once a run
    ended = Exited(137, signal=9, end_reason="killed", restarting=True, stopped_by_user=True)
    writer.send(ended)
    writer.send(MonitorFailed("cannot set up the machine's logs"))
    writer.close()
    reader = EventReader(r)
    try:
        got = [reader.next(), reader.next(), reader.next(), reader.next()]
        assert got == [
            Started(1234),
            ended,
            MonitorFailed("cannot set up the machine's logs"),
            None,
        ]
        assert reader.closed
    finally:
        os.close(r)


def test_the_wire_format_stays_what_older_clis_and_bench_read() -> None:
    assert json.loads(encode(Started(7))) == {"event": "started", "vmm_pid": 7}
    assert json.loads(encode(MonitorFailed("x"))) == {"event": "error", "message": "x"}
    assert json.loads(encode(Exited(0)))["event"] == "exited"


def test_a_gone_reader_does_not_stop_the_monitor() -> None:
    r, w = os.pipe()
    os.close(r)
    writer = EventWriter(w)
    writer.send(Started(1))  # EPIPE (SIGPIPE is ignored by Python)
    assert writer.fd is None
    writer.send(Started(1))


def test_the_first_event_is_read_whole_however_long() -> None:
    """One 4 KB read took a long error message (a long kernel path) in half: json.loads
    of it was a traceback."""
    message = "kernel " + "/k" * 5000 + " missing"
    r, w = os.pipe()

    def write_slowly() -> None:
        data = encode(MonitorFailed(message)) + b"{}\n"
        for i in range(0, len(data), 3000):
            os.write(w, data[i : i + 3000])
        os.close(w)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        assert EventReader(r).next() == MonitorFailed(message)
    finally:
        writer.join()
        os.close(r)


def test_a_monitor_that_says_nothing_gives_no_event() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert EventReader(r).next() is None
    finally:
        os.close(r)


def test_unknown_kinds_are_skipped_and_damaged_events_are_errors() -> None:
    assert decode(b'{"event": "paused", "since": 3}') is None
    assert decode(b'{"event": "started", "vmm_pid": 3, "later": true}') == Started(3)
    for bad in (b"{nope", b"[1]", b'{"event": "started"}', b'{"event": "exited", "exit_code": "0"}',
                b'{"event": "exited", "exit_code": 0, "restarting": 1}'):  # fmt: skip
        with pytest.raises(MachineError, match="monitor"):
            decode(bad)
