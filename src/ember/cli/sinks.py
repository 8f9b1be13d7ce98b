"""Our stdout and stderr written by threads of their own, for an attached run.

``ember run`` (and ``start -a``) copies the machine's output to ours in the loop
that also acts on Ctrl-C.  When whoever reads our output stops reading (a pager
left paused, a full pipe), a write there blocks; in that loop it kept the run
from stopping the machine on Ctrl-C, for as long as the reader slept.  An
``OutputSink`` takes the bytes and writes them in its own thread: the loop only
ever waits a moment, and copies no more while ``LIMIT`` bytes wait for the reader
(the machine's logs keep the rest, as for any slow reader).

The thread writes the descriptor itself (``os.write``), never through Python's
buffered file: at exit, a thread still blocked inside that file would hold its
lock, which the interpreter's last flush of it then waits for.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import IO

from ember.fsutil import write_all


class OutputSink:
    #: bytes that may wait for the reader before the copying loop pauses
    LIMIT = 256 << 10

    def __init__(self, file: IO[bytes], name: str) -> None:
        file.flush()  # what was written through it before goes first
        self.name = name
        self._fd = file.fileno()
        self._chunks: deque[bytes] = deque()
        self._waiting = 0  # bytes in _chunks
        self._writing = False  # the thread has taken a chunk it has not finished
        self._closed = False
        self._cond = threading.Condition()
        #: why writing stopped (BrokenPipeError: the reader went away); later output is dropped
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name=f"ember-{name}", daemon=True)
        self._thread.start()

    def has_room(self) -> bool:
        return self._waiting < self.LIMIT

    def put(self, data: bytes) -> None:
        with self._cond:
            if self.error is None:
                self._chunks.append(data)
                self._waiting += len(data)
                self._cond.notify_all()

    def wait_room(self, timeout: float) -> bool:
        """Until there is room (True) or ``timeout`` seconds have passed."""
        with self._cond:
            return self._cond.wait_for(self.has_room, timeout)

    def wait_written(self, timeout: float) -> bool:
        """Until everything put was written (or writing failed: ``error``), True; False
        once ``timeout`` seconds have passed."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def close(self) -> None:
        """No more output: the thread ends once it has written what it has (a thread still
        blocked on a reader that never reads ends with the process)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _idle(self) -> bool:
        return self.error is not None or (not self._chunks and not self._writing)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._chunks or self._closed)
                if not self._chunks:
                    return
                data = self._chunks.popleft()
                self._writing = True
            try:
                write_all(self._fd, data)
            except OSError as e:
                with self._cond:
                    self.error = e
                    self._chunks.clear()
                    self._waiting = 0
                    self._writing = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._waiting -= len(data)
                self._writing = False
                self._cond.notify_all()
