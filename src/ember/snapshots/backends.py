"""How a snapshot's disk is materialised from its parent.

The snapshotter stores one disk per snapshot and only ever asks a backend for
two things: an empty disk of a size, and a writable copy of a parent's disk.
``reflink`` makes the copy share every block with its parent (FICLONE: constant
time and space on XFS with reflink=1 or btrfs); ``copy`` copies the bytes (any
file system, slow, holes preserved).  A device-mapper thin backend would
implement the same two calls with thin volumes and snapshots.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path

from ember.fsutil import reflink
from ember.snapshots import system
from ember.snapshots.errors import PoolError, SnapshotError

log = logging.getLogger("ember.snapshots")

_CHUNK = 1 << 20


class Backend(ABC):
    name: str

    def create(self, dest: Path, size: int) -> None:
        """An empty ext4 file system of ``size`` bytes at ``dest`` (which must not exist)."""
        system.mkfs_ext4(dest, size)

    @abstractmethod
    def clone(self, src: Path, dest: Path) -> None:
        """A writable, independent copy of ``src`` at ``dest`` (which must not exist)."""


class ReflinkBackend(Backend):
    name = "reflink"

    def clone(self, src: Path, dest: Path) -> None:
        sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                reflink(sfd, dfd)
            except OSError as e:
                os.close(dfd)
                os.unlink(dest)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    # a clone takes room for its metadata: a full pool, not missing reflinks
                    raise PoolError(
                        f"no space left in the snapshot pool to clone {src.name} ({e.strerror})",
                        hint="free space (ember image rm, ember gc) or grow the pool (docs/snapshots.md)",
                    ) from e
                why = (
                    " (the pool's file system has no reflinks; set snapshots.backend to copy)"
                    if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY)
                    else ""
                )
                raise SnapshotError(f"cannot reflink {src.name}: {e.strerror}{why}") from e
            os.close(dfd)
        finally:
            os.close(sfd)


class CopyBackend(Backend):
    name = "copy"
    _warned = False

    def clone(self, src: Path, dest: Path) -> None:
        if not CopyBackend._warned:
            log.warning(
                "snapshot backend 'copy': every layer and machine disk is a full copy (slow, uses"
                " space); put $EMBER_HOME on XFS with reflink or btrfs for the reflink backend"
            )
            CopyBackend._warned = True
        # Plain read/write on purpose: copy_file_range may itself reflink, and this
        # backend promises real copies.  SEEK_DATA/SEEK_HOLE keep the file sparse.
        with open(src, "rb") as fs, open(dest, "xb") as fd:
            size = os.fstat(fs.fileno()).st_size
            offset = 0
            while offset < size:
                try:
                    data_start = os.lseek(fs.fileno(), offset, os.SEEK_DATA)
                except OSError:
                    break  # only a hole remains
                hole = os.lseek(fs.fileno(), data_start, os.SEEK_HOLE)
                pos = data_start
                while pos < hole:
                    chunk = os.pread(fs.fileno(), min(_CHUNK, hole - pos), pos)
                    if not chunk:
                        break
                    os.pwrite(fd.fileno(), chunk, pos)
                    pos += len(chunk)
                offset = hole
            fd.truncate(size)


def backend_by_name(name: str) -> Backend:
    if name == "reflink":
        return ReflinkBackend()
    if name == "copy":
        return CopyBackend()
    raise SnapshotError(f"unknown snapshot backend {name!r} (reflink, copy)")


def reflink_works(directory: Path) -> bool:
    """Probe by cloning a small file: the only test that cannot be fooled by mount options."""
    src = directory / f".reflink-probe-{os.getpid()}"
    dst = directory / f".reflink-probe-{os.getpid()}.clone"
    try:
        with open(src, "wb") as f:
            f.write(b"\0" * 4096)
        try:
            ReflinkBackend().clone(src, dst)
            return True
        except SnapshotError:
            return False
    finally:
        for p in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
