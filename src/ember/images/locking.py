"""The image service's locks: ``images.lock`` (pulls against ``ember gc``) and claims
(pulls and image users against ``image rm``).

``images.lock``: every pull holds it shared from its start to its end, ``ember gc``
exclusively while it sweeps, so the sweep never deletes an unnamed blob that a pull
found in the store and is about to name.

Claims: ``image rm`` used to take ``images.lock`` exclusively too, so it waited for
every pull, of any image, to end, and a pull inside ``image prepare`` or ``image
unpack`` holds it for the whole build.  A removal only deletes the blobs of the
images it forgets, so all it must spare is the blobs that running commands rely on:
each pull, and each command using a local image (``ImageService.ensuring``), writes
the digests it relies on into a claim file under ``run/claims/`` on which it holds an
flock, *before* it looks at the store.  A removal reads the live claims and spares
what they name.  Writing a claim, and a removal from reading the claims to its last
deletion, both hold ``run/claims.lock``, a few file operations long (never a
download): so either the removal saw the claim, or the claim came after the
removal and the pull finds the deleted blobs missing and fetches them again.  A pull
records its image before it drops its claim, so a removal that no longer sees the
claim sees the image.  A claim whose holder died (its flock is free) is stale and
deleted by the next removal.

Lock order, everywhere: ``images.lock``, the snapshotter's ``gc.lock``, then
``claims.lock`` (``ember gc`` takes all three, ``image rm`` the last two).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ember.fsutil import write_all
from ember.home import Home
from ember.locks import FileLock, Notice
from ember.oci.digest import Digest
from ember.oci.errors import FormatError
from ember.store.errors import StoreError

_MAX_CLAIM = 1 << 20


def images_lock(home: Home, *, exclusive: bool, notice: Notice | None = None) -> FileLock:
    """``images.lock`` (unlocked: enter it), its directory made if missing."""
    home.run.mkdir(parents=True, exist_ok=True)
    return FileLock(home.images_lock, shared=not exclusive, notice=notice)


class Claims:
    def __init__(self, home: Home, notice: Notice | None = None) -> None:
        self.directory = home.claims
        self.lock = home.claims_lock
        self.notice = notice

    def _locked(self) -> FileLock:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(self.lock, notice=self.notice)

    @contextlib.contextmanager
    def hold(self, digests: Iterable[Digest]) -> Iterator[None]:
        """Claim ``digests`` while inside: a removal spares them."""
        text = "".join(f"{d}\n" for d in sorted(set(map(str, digests))))
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked():
            path = self.directory / f"{os.getpid()}-{os.urandom(8).hex()}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: never waits
                _write_claim(fd, text.encode(), path)
            except BaseException:
                os.unlink(path)
                os.close(fd)
                raise
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[set[Digest]]:
        """The digests live claims name; no new claim is made while inside."""
        with self._locked():
            claimed: set[Digest] = set()
            try:
                entries = list(os.scandir(self.directory))
            except FileNotFoundError:
                entries = []
            for entry in entries:
                claimed |= self._read_live(Path(entry.path))
            yield claimed

    def _read_live(self, path: Path) -> set[Digest]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return set()  # gone meanwhile (released), or not ember's
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a live claim
                data = os.read(fd, _MAX_CLAIM)
            else:  # its holder died without removing it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return set()
        finally:
            os.close(fd)
        out: set[Digest] = set()
        for line in data.decode(errors="replace").splitlines():
            with contextlib.suppress(FormatError):
                out.add(Digest.parse(line))
        return out


def _write_claim(fd: int, data: bytes, path: Path) -> None:
    """All of ``data`` into the claim, or StoreError: a claim that names only some of
    the digests (a short write on a nearly full disk) would let a removal delete the
    others under the command that relies on them."""
    try:
        write_all(fd, data)
    except OSError as e:
        raise StoreError(
            f"cannot claim the blobs this command uses (so that image rm spares "
            f"them): writing {path} failed ({e.strerror})",
            hint="free space (ember gc removes what no image uses), then try again",
        ) from e
