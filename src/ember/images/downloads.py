"""A pull's downloads: daemon threads that fetch a pull's blobs a few at once, and stop at
once when the pull is cancelled (``ember.images.cancel``).

A blob can be read while it arrives (``Download.open_arriving``): the reader
follows the download's ingest file (``ContentStore.BlobWriter.watch``) and
reads its end only once the whole blob matched its digest.  What it hands out
before that is unverified, so its consumer must check what it made of the
bytes (the layer appliers check the uncompressed stream against the DiffID,
which the verified config names) and throw the result away if the blob then
fails.  A layer thus starts being applied with its first bytes rather than
after its last byte and the fsync that makes it durable.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import suppress

from ember.images.cancel import Cancellation, PullCancelled
from ember.images.errors import ImageError
from ember.images.sources import Source
from ember.oci.manifest import Descriptor
from ember.store.content import ContentStore


class Download:
    """One blob to fetch: what the layer appliers and the recorder wait on.

    Also the observer of the blob's ingest file while it is written (a
    ``WriteObserver``), for readers that take the blob as it arrives."""

    def __init__(self, desc: Descriptor, progress: Callable[[int], None] | None) -> None:
        self.desc = desc
        self.progress = progress
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        #: the ingest file, opened for reading while the blob is written
        self._fd = -1
        self._closed = False
        #: bytes the ingest file holds, and whether they matched the digest
        self._size = 0
        self._verified = False
        #: times the download started over from the blob's first byte (``reset``)
        self._restarts = 0

    def finish(self, error: BaseException | None) -> None:
        """The download's end: the first one said wins (a cancelled pull finishes the
        downloads still running; their workers' own end comes later, or never)."""
        with self._changed:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            self._stop_following()
            self._changed.notify_all()

    def result(self) -> None:
        """Once fetched (a wait an interrupt cuts short); raises what the fetch raised."""
        self._done.wait()
        if self._error is not None:
            raise self._error

    # -- the ingest file, as the downloading thread writes it (WriteObserver) ----------

    def opened(self, fd: int, size: int) -> None:
        with self._changed:
            # Not followed when it resumes bytes an earlier try kept: they are what a
            # failed digest then throws away, after a reader would have used them.
            if self._fd < 0 and not self._closed and size == 0:
                # A file of our own, not a dup of the writer's: that would share the
                # writer's lock on it (flock belongs to the open file) and hold it after
                # the writer is done, keeping another process's pull of the same blob
                # waiting for ours to end (while ours waited for it: a deadlock).
                with suppress(OSError):  # (out of descriptors) readers wait for the stored blob
                    self._fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            self._size = size
            self._changed.notify_all()

    def wrote(self, size: int) -> None:
        with self._changed:
            self._size = size
            self._changed.notify_all()

    def reset(self) -> None:
        with self._changed:
            self._size = 0
            self._restarts += 1
            self._changed.notify_all()

    def verified(self) -> None:
        with self._changed:
            self._verified = True
            self._changed.notify_all()

    # -- readers -----------------------------------------------------------------------

    def open_arriving(self) -> ArrivingBlob | None:
        """A reader of the blob from its first byte while it is still being written; None
        when there is nothing to follow (the blob was already stored, the source copies
        it whole, the download resumes an earlier one's bytes, or it failed or ended
        first): then ``result()`` and read the stored blob.  Waits for the download to
        start writing."""
        with self._changed:
            while self._fd < 0 and not self._done.is_set() and not self._closed:
                self._changed.wait()
            if self._fd < 0 or self._done.is_set():
                return None
            return ArrivingBlob(self, os.dup(self._fd), self._restarts)

    def close(self) -> None:
        """The pull is over: stop following the ingest file (readers keep their own copy)."""
        with self._changed:
            self._closed = True
            self._stop_following()
            self._changed.notify_all()

    def _stop_following(self) -> None:
        """No more readers: ours goes (under ``_changed``)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _available(self, pos: int, restarts: int) -> int:
        """Bytes readable from ``pos`` on by a reader opened after ``restarts`` restarts:
        waits for more; 0 at the verified end; raises what failed the download, and
        BlobRestarted once it started over (see ``ArrivingBlob``)."""
        with self._changed:
            while True:
                if self._error is not None:
                    raise self._error
                if self._restarts != restarts:
                    # Emptied under the reader: how the download ends says more (a digest
                    # that failed, the store emptying the file for the next try) than this.
                    if self._done.is_set():
                        raise self._restarted()
                    self._changed.wait()
                    continue
                if pos < self._size:
                    return self._size - pos
                if self._verified and pos >= self._size:
                    return 0
                if self._done.is_set():  # ended without an error, yet short: never here
                    raise RuntimeError(f"download of {self.desc.digest} ended at {self._size} bytes")
                self._changed.wait()

    def _restarted(self) -> BlobRestarted:
        return BlobRestarted(
            f"the download of blob {self.desc.digest} started over while it was being "
            "read (the registry ignored a resume after a cut connection, or sent bytes "
            "that failed the digest): nothing read of it was kept",
            hint="pull again",
        )


class BlobRestarted(ImageError):
    """A blob's download started over while it was read as it arrived."""


class ArrivingBlob(io.RawIOBase):
    """Reads a blob as its download writes it (``Download.open_arriving``).

    Bytes before the end are handed out as they arrive, unverified; the end (a
    read of 0 bytes) comes only once the whole blob matched its digest, and a
    failed download raises its error instead.  A download that starts over (the
    registry ignored a resume's Range, after a cut connection) raises
    BlobRestarted: the digest checks the second download's bytes only, so a
    reader that went on where it was would get the first one's bytes and then
    the second one's, handed out as verified (a registry could change a pinned
    image's config that way)."""

    def __init__(self, download: Download, fd: int, restarts: int) -> None:
        super().__init__()
        self._download = download
        self._fd = fd
        self._pos = 0
        self._restarts = restarts

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        download = self._download
        while view.nbytes:
            available = download._available(self._pos, self._restarts)
            if not available:
                return 0
            n = os.preadv(self._fd, [view[: min(available, view.nbytes)]], self._pos)
            if download._restarts != self._restarts:
                # emptied (and maybe written again) meanwhile: these bytes may be the
                # second download's; _available says how it ends
                continue
            if n:
                self._pos += n
                return n
        return 0

    def close(self) -> None:
        if not self.closed and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


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
        #: the downloads workers are fetching
        self._running: set[Download] = set()
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
            job = self._queue.popleft()
            self._running.add(job)
            return job

    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                self._source.fetch(
                    job.desc, self._content, job.progress, self.cancellation, observer=job
                )
            except BaseException as e:  # raised by whoever waits for this blob
                job.finish(e)
            else:
                job.finish(None)
            finally:
                with self._lock:
                    self._running.discard(job)

    def cancel(self) -> None:
        """Stop every download: queued ones never start, running ones stop at once.  Both
        end now for whoever waits on them: a request still waiting for the registry's
        answer cannot be cut short, and its worker (a daemon thread) may go on until
        the read timeout, but nobody waits for it (a root disk's clone reading a layer
        as it arrives, in ``ember run``, would have)."""
        self.cancellation.cancel()
        with self._lock:
            left = [*self._queue, *self._running]
            self._queue.clear()
        for job in left:
            job.finish(PullCancelled("the pull was cancelled"))

    def join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
