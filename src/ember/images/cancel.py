"""Stopping a pull's downloads at once: Ctrl-C, a config that is refused, a caller that fails.

Leaving a thread pool waits for the downloads already running, and a download
only looked at nothing but its socket: a Ctrl-C waited for every running blob
to finish (seconds on a slow link, two 60 s read timeouts on a stalled one).
A ``Cancellation`` is checked by the downloads between chunks, and whoever
cancels also runs the ``abort`` callbacks the running downloads registered
(``watch``): the registry client's shuts the connection down, which wakes a
read blocked on a stalled connection at once.  Whatever a download received
before is in its ingest file, so a later pull resumes it with ``Range``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from ember.images.errors import ImageError


class PullCancelled(ImageError):
    """A download stopped because its pull was cancelled.  The pull itself raises what
    cancelled it (an interrupt, the caller's error, a refused config), never this."""


class Cancellation:
    """Thread-safe; ``cancel`` may be called from any thread, any number of times."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._aborts: dict[int, Callable[[], None]] = {}
        self._next = 0

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        """Stop every download: the waiting ones at their next check, the ones blocked in
        a read through their abort callback (run here, in the cancelling thread)."""
        with self._lock:
            self._event.set()
            aborts = list(self._aborts.values())
            # Called under the lock: once ``watch`` has returned, its abort is never
            # called (it could otherwise hit a connection already handed to someone else).
            for abort in aborts:
                with suppress(Exception):
                    abort()

    def check(self) -> None:
        """Raise PullCancelled once cancelled."""
        if self._event.is_set():
            raise PullCancelled("the pull was cancelled")

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (a back-off), cut short and raising once cancelled."""
        self._event.wait(seconds)
        self.check()

    @contextmanager
    def watch(self, abort: Callable[[], None]) -> Iterator[None]:
        """While inside, a ``cancel`` calls ``abort`` (from the cancelling thread) to unblock
        this thread; raises PullCancelled at once if already cancelled."""
        with self._lock:
            self.check()
            key = self._next
            self._next += 1
            self._aborts[key] = abort
        try:
            yield
        finally:
            with self._lock:
                del self._aborts[key]
