"""Applying one layer's tar stream onto ``/`` — the code that runs chroot-ed.

This module assumes the process has already ``chroot``-ed into the target
root (see ``sandbox``): every path is resolved by the kernel inside that
root, so absolute symlinks, ``..`` and symlinked parents all stay inside it.
What this module adds is the OCI semantics (image-spec layer.md):

* whiteouts and opaque whiteouts only hide what *lower* layers put there,
  so an opaque whiteout that comes after some of its directory's entries
  still applies "before the rest of the layer";
* an existing path is replaced (unlink, then create with O_EXCL), never
  written through, so a hard link from a lower layer keeps its old content;
  directory over directory changes metadata only;
* metadata order: chown, then chmod (chown clears setuid/setgid), then
  xattrs (chown also drops security.capability), then times; directory
  times are set at the end of the layer, after their children changed.

Hard link entries carry no metadata of their own (they share the target's
inode), so nothing is chmod-ed through them — the classic escape where a
hard link to a symlink is chmod-ed cannot happen, and would stay inside the
root anyway.
"""

from __future__ import annotations

import base64
import errno
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote

from ember.fsutil import remove_tree
from ember.unpack.errors import InvalidLayer, UnpackError
from ember.unpack.paths import Whiteout, clean, parents, whiteout_of
from ember.unpack.sparse import SparseWriter
from ember.unpack.tarstream import Entry, TarStream

# Host-specific or overlay-internal attributes are never restored (umoci skips the same).
_IGNORED_XATTRS = ("security.selinux", "system.nfs4_acl")
_IGNORED_XATTR_PREFIXES = ("trusted.overlay.",)

#: the largest uid or gid (2**32 - 1 is chown's "leave unchanged")
_MAX_ID = 2**32 - 2

#: what lstat of a directory recorded earlier in the layer fails with once a later entry
#: replaced an ancestor: nothing there, a file, a symlink loop
_GONE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP))

_O_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

T = TypeVar("T")

_REGULAR = frozenset(tarfile.REGULAR_TYPES)
_DEVICE = frozenset((tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE))


def _xattrs(info: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):]
            raw = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=False)
            except ValueError:
                raise InvalidLayer(f"entry {info.name[:200]!r} has an invalid {key[:100]!r} record") from None
        else:
            continue
        if not name or "\x00" in name:
            raise InvalidLayer(f"entry {info.name[:200]!r} has an invalid xattr name {name[:100]!r}")
        if name in _IGNORED_XATTRS or name.startswith(_IGNORED_XATTR_PREFIXES):
            continue
        out.append((name, raw))
    return out


def _mtime_ns(info: tarfile.TarInfo) -> int | None:
    try:
        ns = int(info.mtime * 1_000_000_000) if isinstance(info.mtime, float) else int(info.mtime) * 1_000_000_000
    except (OverflowError, ValueError, TypeError):
        return None
    # utimensat takes a signed 64-bit time_t; refuse nonsense rather than fail.
    if not -(1 << 62) < ns < (1 << 62):
        return None
    return ns


class LayerApplier:
    """Apply the entries of one layer onto ``/`` (the chroot-ed target root)."""

    def __init__(self) -> None:
        #: paths this layer created or changed; whiteouts never remove these
        self.touched: set[str] = set()
        #: directories with something this layer touched below them
        self._holds_touched: set[str] = set()
        #: directory -> mtime its last header gave, set once the layer is done (insertion
        #: order: a directory's header comes before its children's, whose times go first),
        #: with the (st_dev, st_ino) the header was applied to and ``_removals`` then
        self._dir_times: dict[str, tuple[int, int, int, int]] = {}
        #: path -> ``_removals`` after its last removal (an entry replaced it, a whiteout)
        self._removed: dict[str, int] = {}
        self._removals = 0
        self.counts = {
            "entries": 0, "files": 0, "directories": 0, "symlinks": 0, "hardlinks": 0,
            "devices": 0, "whiteouts": 0, "bytes_written": 0, "hole_bytes": 0,
        }

    # -- driver -------------------------------------------------------------------------

    def apply(self, stream: TarStream) -> dict[str, int]:
        for entry in stream:
            self.counts["entries"] += 1
            name = entry.info.name
            try:
                self._entry(stream, entry)
            except UnpackError:
                raise
            except OSError as e:
                raise UnpackError(
                    f"cannot apply layer entry {name[:200]!r}: {e.strerror or e}"
                ) from None
        self._finish_dirs()
        return self.counts

    def _entry(self, stream: TarStream, entry: Entry) -> None:
        info = entry.info
        path = clean(info.name)
        wh = whiteout_of(path, info.name)
        if wh is not None:
            self._whiteout(wh)
            return
        kind = info.type
        if not (0 <= info.uid <= _MAX_ID and 0 <= info.gid <= _MAX_ID):
            raise InvalidLayer(f"layer entry {info.name[:200]!r} has an invalid owner {info.uid}:{info.gid}")
        if path == "/":
            if kind != tarfile.DIRTYPE:
                raise InvalidLayer(
                    f"layer entry {info.name[:200]!r} is the root directory itself but is not a directory"
                )
            self._directory("/", info)
            return
        if kind in _REGULAR:
            self._file(stream, entry, path)
        elif kind == tarfile.DIRTYPE:
            self._directory(path, info)
        elif kind == tarfile.SYMTYPE:
            self._symlink(path, info)
        elif kind == tarfile.LNKTYPE:
            self._hardlink(path, info)
        elif kind in _DEVICE:
            self._device(path, info)
        else:
            raise InvalidLayer(
                f"layer entry {info.name[:200]!r} has an unsupported tar type {kind!r}"
            )

    # -- creation with replace-not-write-through -----------------------------------------

    def _touch(self, path: str) -> None:
        self.touched.add(path)
        parent = posixpath.dirname(path)
        while parent != "/" and parent not in self._holds_touched:
            self._holds_touched.add(parent)
            parent = posixpath.dirname(parent)

    def _make_parents(self, path: str) -> None:
        for p in parents(path):
            try:
                os.mkdir(p, 0o755)
            except FileExistsError:
                if not os.path.isdir(p):  # follows symlinks, inside the root
                    raise InvalidLayer(
                        f"cannot create {path[:200]!r}: its parent {p[:200]!r} is not a directory"
                    ) from None
                continue
            self._touch(p)
            self.counts["directories"] += 1

    def _remove(self, path: str, st: os.stat_result | None = None) -> None:
        if st is None:
            st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            remove_tree(path)  # iterative: a layer's tree may be thousands of levels deep
        else:
            os.unlink(path)
        self._removals += 1
        self._removed[path] = self._removals

    def _create(self, path: str, make: Callable[[], T]) -> T:
        """Run ``make()``, which creates ``path`` exclusively, replacing whatever is there:
        never writing through an existing file, symlink or hard link."""
        try:
            return make()
        except FileExistsError:
            self._remove(path)
        except FileNotFoundError:
            self._make_parents(path)
        except NotADirectoryError:
            raise InvalidLayer(f"cannot create {path[:200]!r}: a parent is not a directory") from None
        return make()

    # -- entry kinds ---------------------------------------------------------------------

    def _file(self, stream: TarStream, entry: Entry, path: str) -> None:
        info = entry.info
        fd = self._create(path, lambda: os.open(path, _O_CREATE_FILE, 0o600))
        try:
            writer = SparseWriter(fd)
            reader = stream.reader
            if entry.regions is None:
                for buf, s, e in reader.chunks(entry.data_size):
                    writer.write(buf, s, e)
            else:
                # GNU/pax sparse member: the archive stores only the listed regions,
                # back to back; everything else is a hole.
                for offset, length in entry.regions:
                    writer.seek(offset)
                    for buf, s, e in reader.chunks(length):
                        writer.write(buf, s, e)
            if writer.holes or entry.regions is not None:
                writer.finish(info.size)
            self.counts["bytes_written"] += entry.data_size
            self.counts["hole_bytes"] += writer.holes
            os.fchown(fd, info.uid, info.gid)
            os.fchmod(fd, info.mode & 0o7777)
            for name, value in _xattrs(info):
                self._setxattr(fd, name, value, info, regular=True)
            ns = _mtime_ns(info)
            if ns is not None:
                os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)
        self._touch(path)
        self.counts["files"] += 1

    def _mkdir(self, path: str) -> bool:
        """Make directory ``path``; False when a directory is already there (kept as is)."""
        try:
            os.mkdir(path, 0o700)
            return True
        except FileExistsError:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        except (FileNotFoundError, NotADirectoryError):
            pass  # _create makes the parents or says which one is in the way
        self._create(path, lambda: os.mkdir(path, 0o700))
        return True

    def _directory(self, path: str, info: tarfile.TarInfo) -> None:
        created = path != "/" and self._mkdir(path)
        if created:
            self.counts["directories"] += 1
        else:
            # Directory over directory: metadata only, but the new header's xattrs are
            # the whole set, as if the directory had been created afresh.
            for name in os.listxattr(path, follow_symlinks=False):
                if name not in _IGNORED_XATTRS and not name.startswith(_IGNORED_XATTR_PREFIXES):
                    os.removexattr(path, name, follow_symlinks=False)
        os.chown(path, info.uid, info.gid, follow_symlinks=False)
        os.chmod(path, info.mode & 0o7777)  # path is a real directory here, not a symlink
        for name, value in _xattrs(info):
            self._setxattr(path, name, value, info, regular=True)
        # A directory's header may come again (a hostile layer: once per entry, each
        # growing a list): the last one's time is the directory's, as its mode is.
        self._dir_times.pop(path, None)
        ns = _mtime_ns(info)
        if ns is not None:
            st = os.lstat(path)
            self._dir_times[path] = (ns, st.st_dev, st.st_ino, self._removals)
        self._touch(path)

    def _symlink(self, path: str, info: tarfile.TarInfo) -> None:
        target = info.linkname
        if not target or "\x00" in target:
            raise InvalidLayer(f"symlink entry {info.name[:200]!r} has an empty or invalid target")
        # The target is stored verbatim, absolute or not: it is only ever resolved
        # later, inside the VM or inside this chroot.
        self._create(path, lambda: os.symlink(target, path))
        os.chown(path, info.uid, info.gid, follow_symlinks=False)
        self._finish_special(path, info)
        self.counts["symlinks"] += 1

    def _hardlink(self, path: str, info: tarfile.TarInfo) -> None:
        # Absolute targets (kaniko writes them) and relative ones both name a path
        # inside the root; clean() makes them so.
        target = clean(info.linkname, "hard link target")
        if target == path:
            return
        if target == "/":
            raise InvalidLayer(f"hard link entry {info.name[:200]!r} points at the root directory")
        try:
            # follow_symlinks=False: a link to a symlink links the symlink itself.
            self._create(path, lambda: os.link(target, path, follow_symlinks=False))
        except FileNotFoundError:
            raise InvalidLayer(
                f"hard link {info.name[:200]!r} points at {info.linkname[:200]!r}, which does not exist"
            ) from None
        except PermissionError:
            raise InvalidLayer(
                f"hard link {info.name[:200]!r} points at {info.linkname[:200]!r}, which cannot be linked "
                "(a directory?)"
            ) from None
        self._touch(path)
        self.counts["hardlinks"] += 1

    def _device(self, path: str, info: tarfile.TarInfo) -> None:
        if info.type == tarfile.FIFOTYPE:
            self._create(path, lambda: os.mkfifo(path, 0o600))
        else:
            fmt = stat.S_IFCHR if info.type == tarfile.CHRTYPE else stat.S_IFBLK
            try:
                dev = os.makedev(info.devmajor, info.devminor)
            except (OverflowError, ValueError):
                raise InvalidLayer(f"device entry {info.name[:200]!r} has an invalid device number") from None
            self._create(path, lambda: os.mknod(path, fmt | 0o600, dev))
        os.chown(path, info.uid, info.gid, follow_symlinks=False)
        os.chmod(path, info.mode & 0o7777)  # just created by us: a device or fifo, not a symlink
        self._finish_special(path, info)
        self.counts["devices"] += 1

    def _finish_special(self, path: str, info: tarfile.TarInfo) -> None:
        """xattrs and mtime of a just-created symlink, device or fifo (never followed)."""
        for name, value in _xattrs(info):
            self._setxattr(path, name, value, info, regular=False)
        ns = _mtime_ns(info)
        if ns is not None:
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
        self._touch(path)

    def _setxattr(self, target: int | str, name: str, value: bytes, info: tarfile.TarInfo,
                  *, regular: bool) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            # user.* is not allowed on symlinks and devices by Linux: skip there.
            if not regular and e.errno == errno.EPERM and name.startswith("user."):
                return
            raise UnpackError(
                f"cannot set xattr {name[:100]!r} on {info.name[:200]!r}: {e.strerror}"
            ) from None

    # -- whiteouts -----------------------------------------------------------------------

    def _whiteout(self, wh: Whiteout) -> None:
        self.counts["whiteouts"] += 1
        if wh.kind == "meta":
            return
        if wh.kind == "opaque":
            self._opaque(wh.path)
            return
        if wh.path in self.touched or wh.path == "/":
            return  # whiteouts hide lower layers only
        try:
            st = os.lstat(wh.path)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISDIR(st.st_mode) and wh.path in self._holds_touched:
            # This layer already put entries inside the lower directory being
            # deleted: delete the lower part only, keep what the layer created.
            self._opaque(wh.path)
        else:
            self._remove(wh.path, st)

    def _opaque(self, directory: str) -> None:
        """Remove what lower layers put under ``directory``, keeping this layer's entries."""
        try:
            st = os.lstat(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        pending = [directory]  # a loop, not recursion: a tree may be thousands of levels deep
        while pending:
            current = pending.pop()
            with os.scandir(current) as it:
                children = list(it)
            for child in children:
                path = posixpath.join(current, child.name)
                keep = path in self.touched or path in self._holds_touched
                if keep and child.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif not keep:
                    self._remove(path)

    def _finish_dirs(self) -> None:
        """Give each directory its header's time, where the path still leads to that
        directory.  A later entry of the layer may have replaced the directory (by a
        file: the time was the file's) or an ancestor (by a file or a symlink loop: the
        layer failed, though Docker and umoci apply it; by a symlink: the time went to
        the directory it points at)."""
        for path, (ns, dev, ino, removals) in reversed(self._dir_times.items()):
            if self._removed_since(path, removals):
                continue  # gone, whatever has its inode number now
            try:
                st = os.lstat(path)
            except OSError as e:
                if e.errno in _GONE:
                    continue
                raise
            if (st.st_dev, st.st_ino) == (dev, ino) and stat.S_ISDIR(st.st_mode):
                os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _removed_since(self, path: str, removals: int) -> bool:
        """Whether ``path`` or a parent of it was removed after ``removals`` removals (the
        identity check alone would miss a directory made since with a reused inode)."""
        if self._removals == removals:
            return False
        while True:
            if self._removed.get(path, 0) > removals:
                return True
            if path == "/":
                return False
            path = posixpath.dirname(path)

