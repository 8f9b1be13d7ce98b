"""Cleanup that Ctrl-C cannot cut in half.

A KeyboardInterrupt is raised wherever the main thread happens to be.  When it
lands in the middle of a cleanup (an unmount waiting for a busy mount to be
let go, say), that cleanup is abandoned: the mount and its loop device stay,
and the next step (removing the mount point) fails with an error that then
replaces the interrupt.  ``deferred()`` holds SIGINT, SIGTERM and SIGHUP while a
cleanup runs and raises them once it is over.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ember.process import HeldInterrupts, interrupts_held


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end; a SIGINT, SIGTERM or SIGHUP that arrives meanwhile is delivered
    (its handler runs: KeyboardInterrupt is raised) once the block is done.

    Only signals with a Python handler are held (``process.interrupts_held``): one at
    its default disposition still ends the process at once, and ``recover`` cleans
    up after it.
    """
    held = HeldInterrupts()
    try:
        with interrupts_held() as held:
            yield
    finally:
        held.deliver()  # raises KeyboardInterrupt (or what it was made to)
