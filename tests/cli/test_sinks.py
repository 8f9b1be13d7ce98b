"""OutputSink: an attached run's stdout and stderr, written by threads of their own."""

from __future__ import annotations

import os

from ember.cli.sinks import OutputSink


def test_a_reader_that_stops_fills_the_sink_not_the_caller_and_gets_everything() -> None:
    r, w = os.pipe()
    with os.fdopen(w, "wb") as dst:
        sink = OutputSink(dst, "test")
        sent = b""
        i = 0
        # never blocks, however long the reader sleeps (room comes while the pipe fills)
        while sink.has_room() or sink.wait_room(0.2):
            chunk = b"%08d\n" % i * 1000
            sink.put(chunk)
            sent += chunk
            i += 1
        assert not sink.has_room() and not sink.wait_written(0.05)
        got = b""
        while len(got) < len(sent):  # the reader comes back
            got += os.read(r, 1 << 16)
        assert sink.wait_written(5) and sink.error is None
        sink.close()
    os.close(r)
    assert got == sent


def test_a_reader_gone_is_the_sinks_error_and_later_output_is_dropped() -> None:
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "wb") as dst:
        sink = OutputSink(dst, "test")
        sink.put(b"x" * 10)
        assert sink.wait_written(5)
        assert isinstance(sink.error, BrokenPipeError)
        sink.put(b"more")
        assert sink.wait_written(0) and sink.has_room()
        sink.close()
