"""A pull's downloads: daemon threads that fetch a pull's blobs a few at once, and stop at
once when the pull is cancelled (``ember.images.cancel``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from ember.images.cancel import Cancellation, PullCancelled
from ember.images.sources import Source
from ember.oci.manifest import Descriptor
from ember.store.content import ContentStore


class Download:
    """One blob to fetch: what the layer appliers and the recorder wait on."""

    def __init__(self, desc: Descriptor, progress: Callable[[int], None] | None) -> None:
        self.desc = desc
        self.progress = progress
        self._done = threading.Event()
        self._error: BaseException | None = None

    def finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    def result(self) -> None:
        """Once fetched (a wait an interrupt cuts short); raises what the fetch raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error


class Downloads:
    """Daemon threads fetching the queued blobs, ``count`` at once, until cancelled.

    Not a ThreadPoolExecutor: leaving one waits for every running task, and its
    threads are joined at exit, which is what kept a Ctrl-C waiting for the blobs
    already downloading."""

    def __init__(
        self, source: Source, content: ContentStore, jobs: Iterable[Download], count: int
    ) -> None:
        self.cancellation = Cancellation()
        self._source = source
        self._content = content
        self._queue = deque(jobs)
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name="ember-download", daemon=True)
            for _ in range(count)
        ]
        for t in self._threads:
            t.start()

    def _take(self) -> Download | None:
        with self._lock:
            if self.cancellation.cancelled or not self._queue:
                return None
            return self._queue.popleft()

    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                self._source.fetch(job.desc, self._content, job.progress, self.cancellation)
            except BaseException as e:  # raised by whoever waits for this blob
                job.finish(e)
            else:
                job.finish(None)

    def cancel(self) -> None:
        """Stop every download: queued ones never start, running ones stop at once."""
        self.cancellation.cancel()
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        for job in left:
            job.finish(PullCancelled("the pull was cancelled"))

    def join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
