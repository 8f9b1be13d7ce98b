"""Cleanup that Ctrl-C cannot cut in half.

A KeyboardInterrupt is raised wherever the main thread happens to be.  When it
lands in the middle of a cleanup (an unmount waiting for a busy mount to be
let go, say), that cleanup is abandoned: the mount and its loop device stay,
and the next step (removing the mount point) fails with an error that then
replaces the interrupt.  ``deferred()`` holds SIGINT, SIGTERM and SIGHUP while a
cleanup runs and raises them once it is over.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from ember.process import INTERRUPTS

_Handler = Callable[[int, FrameType | None], object]


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end; a SIGINT, SIGTERM or SIGHUP that arrives meanwhile is delivered
    (its handler runs: KeyboardInterrupt is raised) once the block is done.

    Only signals with a Python handler are held: one at its default disposition
    still ends the process at once, and ``recover`` cleans up after it.  Python
    runs signal handlers in the main thread only, so elsewhere there is nothing
    to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, FrameType | None]] = []
    saved: dict[int, _Handler] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append((signum, frame))

    try:
        for signum in INTERRUPTS:
            handler = signal.getsignal(signum)
            if callable(handler):
                saved[signum] = handler  # before replacing it: always restored below
                signal.signal(signum, hold)
        yield
    finally:
        for held, handler in saved.items():
            signal.signal(held, handler)
        if pending:
            first, frame = pending[0]
            saved[first](first, frame)  # raises KeyboardInterrupt (or what it was made to)
