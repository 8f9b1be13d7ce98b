"""Blob bytes on disk: upload sessions and publication into the content store.

An upload session is one file ``uploads/<session>`` that only grows.  Its size
*is* the session offset, so a server killed mid-PATCH restarts knowing exactly
what arrived, and a client that asks (GET on the session) resumes from there.
The sha256 of what arrived is kept in memory while the session lives in this
process; after a restart, or for a sha512 digest, the file is hashed again.

Publishing verifies the digest, fsyncs, makes the file read-only and renames
it to ``content/blobs/<alg>/<hex>``: the content store's own commit protocol
(verified, then one atomic rename), without copying the bytes a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

from ember.fsutil import fsync_dir
from ember.locks import FileLock
from ember.oci.digest import Digest
from ember.registry.server.errors import ApiError
from ember.store.content import ContentStore

#: bytes gathered from the request before one write + hash
_WRITE_BUFFER = 1 << 20
_READ_CHUNK = 1 << 20
#: in-memory hash states kept at most (abandoned sessions fall back to rehashing)
_MAX_HASHERS = 4096


class Allowance(Protocol):
    """Room for one upload session to grow into (what a quota leaves it), asked for as
    its body arrives; called under the session's lock."""

    async def grow(self, size: int) -> int:
        """Let the session reach at least ``size`` bytes: the size it may reach now.
        Raises ApiError to refuse (the bytes past the old size are not written)."""
        ...

    async def settle(self, size: int) -> None:
        """The request is over; the session holds ``size`` bytes."""
        ...


class BlobStorage:
    def __init__(self, root: Path) -> None:
        self.content = ContentStore(root / "content")
        self.uploads = root / "uploads"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.gc_lock = root / "gc.lock"
        #: held by the server's periodic purge (one at a time across processes); its
        #: content is when the last purge ran
        self.purge_lock = root / "purge.lock"
        # session -> (offset the hash covers, sha256 object)
        self._hashers: dict[str, tuple[int, Any]] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------------

    def session_path(self, session: str) -> Path:
        return self.uploads / session

    def create_session(self, session: str) -> None:
        fd = os.open(self.session_path(session), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        with self._lock:
            if len(self._hashers) >= _MAX_HASHERS:
                self._hashers.pop(next(iter(self._hashers)))
            self._hashers[session] = (0, hashlib.sha256())

    def session_size(self, session: str) -> int | None:
        try:
            return os.stat(self.session_path(session)).st_size
        except FileNotFoundError:
            return None

    def drop_session(self, session: str, *, busy_status: int | None = 409) -> None:
        """Delete the session's bytes, under its lock: never while a request appends to
        or publishes it (that one is refused instead, ApiError with ``busy_status``);
        a session already gone is no error."""
        try:
            with self._locked(session, os.O_RDONLY, busy_status=busy_status):
                with self._lock:
                    self._hashers.pop(session, None)
                os.unlink(self.session_path(session))
        except ApiError as e:
            if e.code != "BLOB_UPLOAD_UNKNOWN":
                raise

    def drop_session_if_idle(self, session: str) -> bool:
        """``drop_session``, unless another request is using the session (it stays:
        False)."""
        try:
            self.drop_session(session)
        except ApiError:
            return False
        return True

    @contextlib.contextmanager
    def idle_session(self, session: str) -> Iterator[int | None]:
        """The session's size, with its lock held until the block ends (no request
        appends to or publishes it meanwhile; one that comes is refused, as while
        another request holds it); None, and no lock, when a request holds it now or
        its file is gone."""
        with contextlib.ExitStack() as stack:
            try:
                fd = stack.enter_context(self._locked(session, os.O_RDONLY, busy_status=None))
            except ApiError:  # busy, or gone
                fd = -1
            yield None if fd < 0 else os.fstat(fd).st_size

    @contextlib.contextmanager
    def _locked(
        self, session: str, flags: int = os.O_WRONLY | os.O_APPEND, busy_status: int | None = 416
    ) -> Iterator[int]:
        """The session file open (for appending by default), held exclusively (across
        processes too); a session another request holds is refused, not waited for."""
        path = self.session_path(session)
        unknown = ApiError("BLOB_UPLOAD_UNKNOWN", "upload session is unknown")
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise unknown from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ApiError(
                    "BLOB_UPLOAD_INVALID",
                    "another request is using this upload session",
                    status=busy_status,
                ) from None
            # The holder before us may have published or deleted the file after we
            # opened it: a lock on a file no longer at the path guards nothing.
            try:
                here = os.stat(path)
            except FileNotFoundError:
                raise unknown from None
            mine = os.fstat(fd)
            if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                raise unknown
            yield fd
        finally:
            os.close(fd)

    async def append(
        self,
        session: str,
        body: AsyncIterator[bytes],
        expect_offset: int | None,
        limit: int | None = None,
        room: Allowance | None = None,
    ) -> int:
        """Append the request body; the new session size.

        ``expect_offset``: where the client says this chunk starts (Content-Range),
        checked under the lock so that out-of-order or repeated chunks get 416.
        ``limit``: how long the client says the chunk is (Content-Range): the bytes
        past it are not stored, and the request gets 416.
        ``room``: what the session may grow into (what a quota leaves), asked for before
        the bytes that need it are written; a chunk it refuses is not stored, so a body
        is never written whole before the quota is judged.
        Whatever arrived before a client disconnect stays: the size says so.
        """
        with self._locked(session) as fd:
            try:
                return await self._append_locked(session, fd, body, expect_offset, limit, room)
            finally:
                if room is not None:  # under the lock: the session's next request comes after
                    await room.settle(os.fstat(fd).st_size)

    async def _append_locked(
        self,
        session: str,
        fd: int,
        body: AsyncIterator[bytes],
        expect_offset: int | None,
        limit: int | None,
        room: Allowance | None,
    ) -> int:
        offset = os.fstat(fd).st_size
        if expect_offset is not None and expect_offset != offset:
            raise ApiError(
                "BLOB_UPLOAD_INVALID",
                f"chunk starts at {expect_offset} but the upload has {offset} bytes",
                status=416,
                headers={"Range": range_header(offset)},
            )
        with self._lock:
            state = self._hashers.pop(session, None)
        hasher: Any
        if state is not None and state[0] == offset:
            hasher = state[1]
        elif offset:
            # another process (a sibling worker, or this server before a restart)
            # wrote part of the session: bring a hash up to date off the loop
            hasher = await asyncio.to_thread(self._hash_prefix, session, state, offset)
        else:
            hasher = hashlib.sha256()
        buf = bytearray()

        def flush() -> None:
            """Write ``buf`` out.  What reached the file, and only that, is hashed, counted
            and dropped from ``buf``, also when a write fails after a short one: the
            flush on the way out (``finally`` below) must not write those bytes again
            (the file would no longer be what the client sent, its size the offset)."""
            nonlocal offset
            written = 0
            try:
                with memoryview(buf) as whole:
                    while written < len(whole):
                        with whole[written:] as rest:
                            written += os.write(fd, rest)
            finally:
                if written == len(buf):
                    hasher.update(buf)
                    buf.clear()
                elif written:
                    hasher.update(bytes(buf[:written]))
                    del buf[:written]
                offset += written

        left = limit
        cap = offset  # the size this request may reach without asking ``room`` for more
        try:
            async for chunk in body:
                too_long = left is not None and len(chunk) > left
                if left is not None:
                    chunk = chunk[:left]
                    left -= len(chunk)
                if room is not None and offset + len(buf) + len(chunk) > cap:
                    cap = await room.grow(offset + len(buf) + len(chunk))
                buf += chunk
                if too_long:
                    raise ApiError(
                        "BLOB_UPLOAD_INVALID",
                        f"the chunk is longer than the {limit} bytes its Content-Range says",
                        status=416,
                    )
                if len(buf) >= _WRITE_BUFFER:
                    flush()
        finally:
            # also on disconnect: what arrived is kept, and the hash matches it
            flush()
            with self._lock:
                if len(self._hashers) >= _MAX_HASHERS:
                    self._hashers.pop(next(iter(self._hashers)))
                self._hashers[session] = (offset, hasher)
        return offset

    # -- publication -------------------------------------------------------------

    def _hash_prefix(self, session: str, state: tuple[int, Any] | None, upto: int) -> Any:
        """A sha256 of the session's first ``upto`` bytes, continuing ``state`` when it
        covers a prefix of them (the file only grows, so that prefix is unchanged)."""
        covered, hasher = state if state is not None and state[0] <= upto else (0, hashlib.sha256())
        fd = os.open(self.session_path(session), os.O_RDONLY)
        try:
            _hash_range(fd, hasher, covered, upto)
        finally:
            os.close(fd)
        return hasher

    def publish(self, session: str, digest: Digest) -> int:
        """Verify the session's bytes against ``digest`` and publish them; the size.

        Blocking: call from a worker thread.  On a mismatch the session is
        left as it is (the client may cancel it; GC frees it after expiry).
        """
        path = self.session_path(session)
        with self._locked(session, os.O_RDONLY, busy_status=None) as fd:
            size = os.fstat(fd).st_size
            with self._lock:
                state = self._hashers.get(session)
            if digest.algorithm == "sha256":
                if state is not None and state[0] <= size:
                    covered, hasher = state[0], state[1].copy()
                else:
                    covered, hasher = 0, hashlib.sha256()
                got = _hash_range(fd, hasher, covered, size).hexdigest()
            else:
                got = _hash_range(fd, hashlib.new(digest.algorithm), 0, size).hexdigest()
            if got != digest.hex:
                raise ApiError(
                    "DIGEST_INVALID",
                    f"uploaded content has digest {digest.algorithm}:{got}, not {digest}",
                )
            target = self.content.path(digest)
            if target.exists():
                os.unlink(path)  # identical bytes are already published
                touch(target)
            else:
                os.fsync(fd)
                os.fchmod(fd, 0o444)
                # fresh mtime: GC's grace period counts from publication, not first byte
                os.utime(fd)
                os.rename(path, target)
                fsync_dir(target.parent)
        with self._lock:
            self._hashers.pop(session, None)
        return size

    # -- coordination with GC ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def publishing(self) -> AsyncIterator[None]:
        """Held (shared) from making a blob fresh until its link or row is committed."""
        lock = FileLock(self.gc_lock, shared=True)
        while not lock.acquire(blocking=False):
            await asyncio.sleep(0.02)  # a GC sweep is deleting files; it is short
        try:
            yield
        finally:
            lock.release()

    def collecting(self) -> FileLock:
        """Held (exclusive) by GC while it deletes blob files (enter it)."""
        return FileLock(self.gc_lock)

    @contextlib.contextmanager
    def gc_lock_if_free(self, *, exclusive: bool) -> Iterator[bool]:
        """The GC lock if it can be had at once (shared: alongside the writers that
        hold it so, not during a sweep; exclusive: alone): yields whether it was."""
        lock = FileLock(self.gc_lock, shared=not exclusive)
        got = lock.acquire(blocking=False)
        try:
            yield got
        finally:
            lock.release()

    # -- reading -----------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.content.path(digest)


def _hash_range(fd: int, hasher: Any, start: int, end: int) -> Any:
    """Feed bytes [start, end) of ``fd`` to ``hasher``; returns it."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
        if not chunk:
            raise ApiError("BLOB_UPLOAD_INVALID", "upload session file is shorter than recorded")
        hasher.update(chunk)
        pos += len(chunk)
    return hasher


def touch(path: Path) -> None:
    """Make a published blob fresh for GC (it may be about to gain a link)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def range_header(size: int) -> str:
    """The ``Range`` value of upload responses: ``0-<last byte>``, no ``bytes=``.

    Distribution answers ``0-0`` for an empty session; clients expect that.
    """
    return f"0-{max(size - 1, 0)}"
