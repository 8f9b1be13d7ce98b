"""Pieces of ``ember run`` that need no VM (the VM runs are in tests/integration)."""

from __future__ import annotations

import json
import os
import threading

from ember.cli.run import _read_line


def test_the_monitors_first_line_is_read_whole_however_long() -> None:
    """One 4 KB read took a long error message (a long kernel path) in half: json.loads
    of it was a traceback."""
    message = json.dumps({"event": "error", "message": "kernel " + "/k" * 5000 + " missing"})
    r, w = os.pipe()

    def write_slowly() -> None:
        data = (message + "\n{}\n").encode()
        for i in range(0, len(data), 3000):
            os.write(w, data[i : i + 3000])
        os.close(w)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        assert json.loads(_read_line(r)) == json.loads(message)
    finally:
        writer.join()
        os.close(r)


def test_a_monitor_that_says_nothing_gives_an_empty_line() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert _read_line(r) == b""
    finally:
        os.close(r)
