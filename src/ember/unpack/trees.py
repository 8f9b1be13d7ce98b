"""What the layer applier writes to: a directory tree behind a small interface.

``LayerApplier`` holds the OCI semantics (whiteouts, replace-not-write-through,
metadata order); a ``Tree`` only does single file-system operations on absolute
paths inside its root, and fails as the kernel's calls do (``FileExistsError``,
``FileNotFoundError``, ``NotADirectoryError``...).  Two trees exist:

* ``HostTree``: the kernel's file system at ``/``, in a process that has
  ``chroot``-ed into the target (``sandbox``): ``ember image unpack`` and
  volume copy-up write a directory this way;
* ``Ext4Tree`` (``ext4tree``): an ext4 image file written through libext2fs,
  no mount at all: how snapshots are built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from ember.fsutil import remove_tree
from ember.unpack.sparse import SparseWriter


@dataclass(frozen=True)
class Meta:
    """What a new symlink, fifo or device gets right away: owner, then permission bits
    (not for a symlink), then its time (mtime and atime, ns; None: now)."""

    uid: int
    gid: int
    mode: int | None
    ns: int | None


class StatLike(Protocol):
    @property
    def st_mode(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_dev(self) -> int: ...


class NewFile(Protocol):
    """A regular file just created by ``Tree.create_file``: data written front to back
    (``seek`` only forward, over a hole), then its metadata, then ``close``."""

    holes: int  # bytes of the data left as holes (aligned runs of zeros)

    def write(self, buf: bytes, start: int, end: int) -> None: ...
    def seek(self, offset: int) -> None: ...
    def finish(self, size: int) -> None: ...
    def chown(self, uid: int, gid: int) -> None: ...
    def chmod(self, mode: int) -> None: ...
    def setxattr(self, name: str, value: bytes) -> None: ...
    def utime(self, ns: int) -> None: ...
    def close(self) -> None: ...


class Tree(Protocol):
    """File-system operations on absolute paths inside a root.  A path's parents are
    followed through symlinks (inside the root); its last component never is, except
    by ``is_dir``."""

    def lstat(self, path: str) -> StatLike: ...
    def is_dir(self, path: str) -> bool: ...
    def mkdir(self, path: str, mode: int) -> None: ...
    def create_file(self, path: str) -> NewFile: ...
    def symlink(self, target: str, path: str, meta: Meta | None = None) -> None: ...
    def link(self, target: str, path: str) -> None: ...
    def mkfifo(self, path: str, mode: int, meta: Meta | None = None) -> None: ...
    def mknod(self, path: str, mode: int, device: int, meta: Meta | None = None) -> None: ...
    def unlink(self, path: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def listdir(self, path: str) -> list[tuple[str, bool]]: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...
    def chmod(self, path: str, mode: int) -> None: ...
    def setxattr(self, path: str, name: str, value: bytes) -> None: ...
    def listxattr(self, path: str) -> list[str]: ...
    def removexattr(self, path: str, name: str) -> None: ...
    def utime(self, path: str, ns: int) -> None: ...


_O_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class HostFile:
    __slots__ = ("fd", "_writer")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._writer = SparseWriter(fd)

    @property
    def holes(self) -> int:
        return self._writer.holes

    def write(self, buf: bytes, start: int, end: int) -> None:
        self._writer.write(buf, start, end)

    def seek(self, offset: int) -> None:
        self._writer.seek(offset)

    def finish(self, size: int) -> None:
        self._writer.finish(size)

    def chown(self, uid: int, gid: int) -> None:
        os.fchown(self.fd, uid, gid)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    def setxattr(self, name: str, value: bytes) -> None:
        os.setxattr(self.fd, name, value)

    def utime(self, ns: int) -> None:
        os.utime(self.fd, ns=(ns, ns))

    def close(self) -> None:
        os.close(self.fd)


class HostTree:
    """The tree at ``/`` of this process (chroot-ed into the target by ``sandbox``):
    the kernel resolves every path inside it."""

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(path, mode)

    def create_file(self, path: str) -> HostFile:
        return HostFile(os.open(path, _O_CREATE_FILE, 0o600))

    def symlink(self, target: str, path: str, meta: Meta | None = None) -> None:
        os.symlink(target, path)
        self._meta(path, meta)

    def link(self, target: str, path: str) -> None:
        # follow_symlinks=False: a link to a symlink links the symlink itself
        os.link(target, path, follow_symlinks=False)

    def mkfifo(self, path: str, mode: int, meta: Meta | None = None) -> None:
        os.mkfifo(path, mode)
        self._meta(path, meta)

    def mknod(self, path: str, mode: int, device: int, meta: Meta | None = None) -> None:
        os.mknod(path, mode, device)
        self._meta(path, meta)

    def _meta(self, path: str, meta: Meta | None) -> None:
        """In the kernel's order: chown (which clears set-id bits), chmod, times."""
        if meta is not None:
            self.chown(path, meta.uid, meta.gid)
            if meta.mode is not None:
                self.chmod(path, meta.mode)
            if meta.ns is not None:
                self.utime(path, meta.ns)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def remove_tree(self, path: str) -> None:
        remove_tree(path)  # iterative: a layer's tree may be thousands of levels deep

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        with os.scandir(path) as it:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)  # only ever on a directory or device the applier just checked

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(path, name, value, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(path, follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(path, name, follow_symlinks=False)

    def utime(self, path: str, ns: int) -> None:
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
