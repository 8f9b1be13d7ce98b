"""The content store: immutable blobs addressed by digest (containerd's model).

Layout under its root::

    blobs/<algorithm>/<hex>     committed, verified content (read-only files)
    ingest/<algorithm>-<hex>    partial writes, resumable, never visible as blobs

A blob becomes visible only by an atomic rename after its digest and size were
verified and its bytes fsync'ed, so a kill -9 at any moment leaves either no
blob or a complete one.  Partial downloads survive for resume; ``prune_ingests``
discards stale ones (``stale_ingests`` counts them without deleting).  A blob
copied from a local file (``ingest``) is never resumed: it keeps nothing when it
fails.

The rename itself is made durable by an fsync of the blob directory: at once
per blob, or, inside ``batch()``, once for all the blobs of the batch when it
ends (a pull fsyncs the directory once, before it records the image that names
the blobs, instead of once per blob).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ember.fsutil import fsync_dir
from ember.oci.digest import Digest, Verifier
from ember.store.errors import BlobNotFound, DamagedBlob, StoreError

_CHUNK = 1 << 20
#: stored blobs up to this size are hashed before a fetch skips them (``size_for_reuse``):
#: manifests (at most 4 MiB), configs (kilobytes as a rule) and small layers, a few
#: milliseconds at most; larger ones only when their size is not the one declared
REHASH_LIMIT = 4 << 20


class WriteObserver(Protocol):
    """Follows a BlobWriter's ingest file while it is written (``BlobWriter.watch``):
    what lets a reader consume a blob as it arrives."""

    def opened(self, fd: int, size: int) -> None:
        """The ingest file (the writer's descriptor: open it anew through /proc/self/fd to
        keep it; a dup would share, and keep, the writer's lock), holding ``size`` bytes
        already (a resumed write)."""

    def wrote(self, size: int) -> None:
        """The file now holds ``size`` bytes."""

    def reset(self) -> None:
        """Its content was thrown away: the file is empty again."""

    def verified(self) -> None:
        """Its content matched the digest and size (just before it is made durable and
        published)."""


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.ingest_dir = root / "ingest"
        for d in (self.blobs / "sha256", self.blobs / "sha512", self.ingest_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._batch_lock = threading.Lock()
        self._batches = 0
        #: blob directories with renames not yet fsync'ed (inside a batch)
        self._unsynced: set[Path] = set()

    # -- durability of names ---------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Blobs committed meanwhile (by any thread using this store) get one
        directory fsync at the end instead of one each.

        A blob is still never visible before it is verified and its bytes are
        durable; only its name's durability waits for the end of the batch, so
        a caller must not record anything that names these blobs durably
        before the batch has ended (on an error too, what was renamed is synced).
        """
        with self._batch_lock:
            self._batches += 1
        try:
            yield
        finally:
            with self._batch_lock:
                self._batches -= 1
                dirs = sorted(self._unsynced) if self._batches == 0 else []
                if self._batches == 0:
                    self._unsynced.clear()
            for d in dirs:
                fsync_dir(d)

    def sync_names(self, named: Iterable[Digest] = ()) -> None:
        """Make the names of the blobs committed so far durable now, inside a batch too
        (before recording something that names them while the batch goes on); and those
        of the blobs ``named`` (what the record will name), which another process may
        have renamed into place and not synced yet: a pull that found every blob already
        there recorded its image before their names were on disk."""
        with self._batch_lock:
            dirs = set(self._unsynced)
            self._unsynced.clear()
        dirs.update(self.path(d).parent for d in named)
        for d in sorted(dirs):
            fsync_dir(d)

    def _published(self, directory: Path) -> None:
        """A blob was just renamed into ``directory``: make that durable now or at batch end."""
        with self._batch_lock:
            if self._batches:
                self._unsynced.add(directory)
                return
        fsync_dir(directory)

    # -- reading -------------------------------------------------------------

    def path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex

    def exists(self, digest: Digest) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: Digest) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the content store") from None

    def open(self, digest: Digest) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the content store") from None

    def read_bytes(self, digest: Digest) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def matches(self, digest: Digest) -> bool:
        """Whether the stored blob still hashes to its name (reads all of it); False when
        it is missing."""
        try:
            with open(self.path(digest), "rb") as f:
                return hashlib.file_digest(f, digest.algorithm).hexdigest() == digest.hex
        except FileNotFoundError:
            return False

    def raise_if_damaged(self, digests: Iterable[Digest], failure: Exception) -> None:
        """After reading blobs failed with ``failure``: blame the store if one of them no
        longer matches its digest (damaged on disk after it was verified and named).  That
        blob is deleted, so that the next pull fetches it again, since a pull skips the blobs
        the store has; DamagedBlob says so.  Returns when every blob is intact."""
        for digest in digests:
            if self.remove_if_damaged(digest):
                raise DamagedBlob(
                    f"blob {digest} in the content store no longer matches its digest "
                    f"(damaged on disk; reading it failed: {str(failure)[:200]}); it was removed",
                    hint="run the command again: it fetches the blob again",
                )

    def read_intact(self, digest: Digest) -> bytes:
        """A small stored blob's bytes, checked against its digest; one damaged on disk is
        removed (``remove_if_damaged``: the next fetch stores it anew) and DamagedBlob
        raised, unless a good copy took its place meanwhile, which is read instead."""
        data = self.read_bytes(digest)
        if Digest.of(data, digest.algorithm) == digest:
            return data
        if self.remove_if_damaged(digest):
            raise DamagedBlob(
                f"blob {digest} in the content store no longer matches its digest (damaged "
                "on disk); it was removed",
                hint="run the command again: it fetches the blob again",
            )
        return self.read_bytes(digest)  # intact now: another pull put a good copy there

    def remove_if_damaged(self, digest: Digest) -> bool:
        """Whether the stored blob ``digest`` no longer matches its digest (damaged on disk
        after it was verified and named): it is then removed, so that a fetch stores it
        anew, since every fetch skips what the store has.  False when it is intact or
        missing.  Reads all of it.

        The removal holds the lock under which every writer of this blob publishes it
        (``_publishing``): a concurrent pull may have put a good copy in its place since
        the first look, and that copy, which it is about to record, must not be the one
        removed."""
        if not self.exists(digest) or self.matches(digest):  # as a rule: no lock to take
            return False
        with self._publishing(digest):
            if self.matches(digest):  # replaced by a good copy meanwhile
                return False
            self.delete(digest)  # (or removed meanwhile, by another that found it damaged)
            return True

    def size_for_reuse(self, digest: Digest, declared: int) -> int | None:
        """The size of the stored blob ``digest``, for a fetch that would skip it, its
        descriptor declaring ``declared`` bytes; None when the store has no intact copy
        (missing, or damaged and now removed: fetch it).

        A stored blob was verified, so a size other than ``declared`` means either that
        the copy was damaged since (a torn write, a truncated file) or that the descriptor
        is wrong: the copy is hashed to tell which, and when it is intact its size is
        returned for the caller to refuse the descriptor.  A small blob (a manifest, a
        config) is hashed whatever its size; a large one whose size matches is trusted,
        since hashing every stored layer on every pull would cost the pull a read of
        each (its DiffID is checked when it is applied, ``raise_if_damaged``)."""
        try:
            size = self.size(digest)
        except BlobNotFound:
            return None
        if size == declared and size > REHASH_LIMIT:
            return size
        if self.remove_if_damaged(digest):
            return None
        try:
            return self.size(digest)  # intact (perhaps a good copy that replaced it)
        except BlobNotFound:
            return None  # removed meanwhile (an image rm): fetch it

    @contextlib.contextmanager
    def _publishing(self, digest: Digest) -> Iterator[None]:
        """Hold the lock a writer of ``digest`` holds from its first byte through its
        rename into ``blobs/`` (its ingest file's flock): no copy of the blob is published
        meanwhile.  Waits for a writer at work."""
        path = self.ingest_dir / f"{digest.algorithm}-{digest.hex}"
        fd = _lock_ingest(path)
        try:
            yield
        finally:
            # made by us (or left empty): as a writer does, not a partial download to keep
            if os.fstat(fd).st_size == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            os.close(fd)

    def list(self) -> Iterator[Digest]:
        for algdir in sorted(self.blobs.iterdir()):
            for entry in os.scandir(algdir):
                if entry.is_file() and not entry.name.startswith("."):
                    yield Digest(algdir.name, entry.name)

    # -- writing -------------------------------------------------------------

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        if expected is not None:
            check = Verifier(expected, len(data))
            check.update(data)
            check.verify()
        digest = expected or Digest.of(data)
        # a stored copy is hashed first (it is small): one damaged on disk is replaced,
        # not taken for the verified bytes in hand
        if self.size_for_reuse(digest, len(data)) != len(data):
            self.ingest(digest, len(data), [data])
        return digest

    def ingest(
        self,
        expected: Digest,
        size: int | None,
        chunks: Iterable[bytes | memoryview],
        progress: Callable[[int], None] | None = None,
        check: Callable[[Path], None] | None = None,
    ) -> None:
        """Store a blob from a local stream in one go (no resume), verified.

        Raises DigestMismatch when the stream is not what ``expected``/``size``
        promise, StoreError when ``size`` exceeds the free space.  ``check`` gets the
        written file, once its digest and size are verified and before it is
        published: what it raises refuses the blob.  Whatever fails, nothing is kept:
        a local source is read again from its start, so a partial file would only
        take space until ``ember gc``.
        """
        with self.writer(expected, size, resumable=False) as w:
            if w.already_committed:
                return
            w.reset()
            try:
                if size is not None:
                    self._check_space(expected, size)
                for chunk in chunks:
                    w.write(chunk)
                    if progress:
                        progress(len(chunk))
                w.verify()
                if check is not None:
                    check(w.ingest_path)
                w.commit()
            except BaseException:
                w.reset()  # __exit__ then removes the empty file
                raise

    def _check_space(self, digest: Digest, size: int) -> None:
        """Refuse at once a blob the file system cannot hold, rather than fill it first."""
        st = os.statvfs(self.ingest_dir)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise StoreError(
                f"no space for blob {digest} in {self.root}: it is {size} bytes, "
                f"{free} are free",
                hint="free space (ember gc removes what no image uses), then try again",
            )

    def writer(
        self, expected: Digest, expected_size: int | None = None, *, resumable: bool = True
    ) -> BlobWriter:
        """A writer for one blob; ``commit()`` verifies and publishes it.  ``resumable``:
        its caller resumes partial content (a download), which a full disk keeps."""
        return BlobWriter(self, expected, expected_size, resumable=resumable)

    def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self.path(digest))
            return True
        except FileNotFoundError:
            return False

    def prune_ingests(self, older_than: float) -> int:
        """Remove partial writes untouched for ``older_than`` seconds that nobody holds."""
        return self.stale_ingests(older_than, remove=True)[0]

    def stale_ingests(self, older_than: float, *, remove: bool = False) -> tuple[int, int]:
        """Partial writes untouched for ``older_than`` seconds that nobody holds: how many,
        and their bytes.  ``remove``: delete them (``prune_ingests``); without it nothing
        changes (what a dry run of a collection reports)."""
        count = size = 0
        now = time.time()
        for entry in os.scandir(self.ingest_dir):
            try:
                st = entry.stat(follow_symlinks=False)
                if now - st.st_mtime < older_than:
                    continue
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:  # gone meanwhile; a symlink, a directory: not ember's, left alone
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a writer holds it
                os.close(fd)
                continue
            try:
                held, named = os.fstat(fd), os.stat(entry.path, follow_symlinks=False)
                if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
                    # another pruner removed the file we opened, and a writer made a new
                    # one under its name since: that one is not ours to unlink
                    continue
                if remove:
                    os.unlink(entry.path)
                count += 1
                size += held.st_size
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        return count, size


class BlobWriter:
    """Writes one blob into ``ingest/``; resumes where a previous writer stopped.

    Holds an exclusive lock on its ingest file, so two processes never write the
    same blob at once; the second blocks until the first is done and then finds
    the blob committed.
    """

    def __init__(
        self,
        store: ContentStore,
        expected: Digest,
        expected_size: int | None,
        *,
        resumable: bool = True,
    ) -> None:
        self.store = store
        self.expected = expected
        self.expected_size = expected_size
        self.resumable = resumable
        self.ingest_path = store.ingest_dir / f"{expected.algorithm}-{expected.hex}"
        self._fd = -1
        self._verifier = Verifier(expected, expected_size)
        self.committed = False
        self._observer: WriteObserver | None = None

    def __enter__(self) -> BlobWriter:
        fd = self._fd = _lock_ingest(self.ingest_path)
        # Re-hash what an earlier, interrupted writer left, so that a resume is verified too.
        while chunk := os.read(fd, _CHUNK):
            if not self._within_size(len(chunk)):
                self._restart()
                break
            self._verifier.update(chunk)
        return self

    def _within_size(self, n: int) -> bool:
        return self.expected_size is None or self._verifier.size + n <= self.expected_size

    def _restart(self) -> None:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._verifier = Verifier(self.expected, self.expected_size)
        if self._observer is not None:
            self._observer.reset()

    def watch(self, observer: WriteObserver) -> None:
        """Tell ``observer`` about this (entered) writer's file from now on."""
        self._observer = observer
        observer.opened(self._fd, self.offset)

    @property
    def offset(self) -> int:
        """Bytes already held: a downloader resumes from here with ``Range``."""
        return self._verifier.size

    @property
    def already_committed(self) -> bool:
        return self.store.exists(self.expected)

    def reset(self) -> None:
        """Throw away partial content (e.g. the server ignored our Range request)."""
        self._restart()

    def write(self, data: bytes | memoryview) -> None:
        self._verifier.update(data)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if not self.resumable:  # its caller drops what was written
                    raise StoreError(
                        f"no space left for blob {self.expected} in {self.store.root} "
                        f"({e.strerror}): nothing of it was kept",
                        hint="free space (ember gc removes what no image uses), then try again",
                    ) from e
                raise StoreError(
                    f"no space left for blob {self.expected} in {self.store.root} "
                    f"({e.strerror}): what arrived stays in {self.ingest_path} for a later pull "
                    "to resume",
                    hint="free space, or drop partial downloads: ember gc --ingest-grace 0",
                ) from e
            view = view[n:]
        if self._observer is not None:
            self._observer.wrote(self._verifier.size)

    def verify(self) -> None:
        """Check the digest and size of what was written (DigestMismatch, and the content
        is thrown away); ``commit`` does it too."""
        try:
            self._verifier.verify()
        except Exception:
            self._restart()
            raise

    def commit(self) -> Digest:
        """Verify digest and size, then publish the blob atomically."""
        target = self.store.path(self.expected)
        self.verify()
        if self._observer is not None:
            self._observer.verified()
        os.fsync(self._fd)
        os.fchmod(self._fd, 0o444)
        try:
            os.rename(self.ingest_path, target)
        except OSError as e:
            raise StoreError(f"cannot publish blob {self.expected}: {e}") from e
        self.committed = True
        self.store._published(target.parent)
        return self.expected

    def __exit__(self, *exc: object) -> None:
        if self._fd < 0:
            return
        # Keep a partial file only if it is worth resuming; we still hold its lock here.
        if not self.committed and (self._verifier.size == 0 or self.store.exists(self.expected)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ingest_path)
        os.close(self._fd)
        self._fd = -1


def _lock_ingest(path: Path) -> int:
    """``path`` (a blob's ingest file) opened, made if missing, and flock'ed exclusively:
    the lock every writer of that blob holds from its first byte through the rename that
    publishes it."""
    while True:
        fd = _open_ingest(path)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder we waited for may have published this very inode as the
        # blob: only keep the lock if the ingest path still names our file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _open_ingest(path: Path) -> int:
    """The ingest file, never through a symlink: a writer truncates and writes it, then
    publishes it, so a link planted there would overwrite its target and make the blob
    a link to it."""
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        fd = -1
    if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd >= 0:
        os.close(fd)
    raise StoreError(
        f"{path} is not a regular file (ember never makes anything else there): remove it"
    )
