"""A ``Tree`` that is an ext4 image file, written through libext2fs: no loop device,
no mount, no kernel file system in the way.

A snapshot's disk is built by applying its layer onto a clone of its parent's
disk.  Doing that through the kernel costs a loop device, a mount, a sync and an
unmount per layer (~10 ms each time on the hosts measured, more than applying a
small layer itself); here the layer's entries go straight into the image,
as ``mkfs.ext4 -d`` and ``debugfs`` write one.  It is also confined by
construction: every path is looked up inside the image, from its root inode
(a symlink, absolute or with ``..``, resolves inside it too), and nothing on
the host is opened by name but the image itself.

Semantics follow the kernel's where the applier can tell: the errors of the
calls (through ``libext2fs.failure``), link counts, ``user.*`` xattrs refused
on symlinks and devices, mode and owner rules.  New entries get the owner
root:root and the time of the apply, as the kernel gives them in a chroot;
directories stay linear (the guest's kernel indexes one when it grows it).
File data is written in whole blocks, zero blocks left as holes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
from dataclasses import dataclass

from ember.unpack import libext2fs as ext2
from ember.unpack.errors import NeedsKernel
from ember.unpack.libext2fs import Inode
from ember.unpack.sparse import data_extents
from ember.unpack.trees import Meta

#: data is written to the image in runs of up to this much
_FLUSH = 1 << 20
#: the kernel's limit on an ext4 file's hard links
_LINK_MAX = 65000
_NAME_MAX = 255
#: a symlink target shorter than this is kept in the inode (its i_block)
_FAST_SYMLINK_MAX = 60
#: symlinks followed in one path at most (the kernel's MAXSYMLINKS)
_MAX_LINKS = 40
#: the xattr namespaces ext4 stores (the kernel refuses others with EOPNOTSUPP)
_XATTR_PREFIXES = ("user.", "trusted.", "security.")
_XATTR_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
#: directory entries read by ext2fs_link in one layer (~35 ns each here) before the layer
#: is handed to the kernel: each link reads its whole directory, so a layer that puts
#: 100,000 entries in one directory would take minutes (the kernel's are hashed)
_LINK_SCAN_BUDGET = 30_000_000
#: blocks read to make the unix I/O channel write its cache back (it reads more than 4
#: past its cache, after writing the dirty ones: unix_io.c's WRITE_DIRECT_SIZE)
_CACHE_FLUSHING_READ = 5
_INCOMPAT_EXTENTS = 0x40


@dataclass(frozen=True)
class Ext4Stat:
    st_mode: int
    st_ino: int
    st_dev: int = 0


def _encode(name: str) -> bytes:
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise OSError(errno.EINVAL, "Invalid argument (a NUL in a name)", name)
    return raw


def _split(path: str) -> tuple[str, bytes]:
    parent, _, name = path.rpartition("/")
    raw = _encode(name)
    if len(raw) > _NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    return parent or "/", raw


def _time_fields(ns: int) -> tuple[int, int]:
    """ext4's encoding of a time: the low 32 bits of the seconds, and the extra word
    (two epoch bits extending them, then the nanoseconds)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    low = sec & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    epoch = ((sec - signed_low) >> 32) & 3
    return low, epoch | (nsec << 2)


class Ext4Tree:
    """The ext4 file system in the image file ``image``, open for writing until
    ``close`` (which writes its metadata back) or ``abandon`` (which does not).

    ``flush`` then ``switch_to`` go on in a copy of the image: a snapshot chain's next
    layer is applied to a reflink clone of the disk just written, and the open file
    system (bitmaps, group descriptors, caches) is the clone's as much as the
    original's.  That spares opening each layer's disk: ``ext2fs_open`` fsyncs the
    file it opens (e2fsprogs 1.47.0), a log force on the pool's XFS for a fresh clone."""

    def __init__(self, image: str | os.PathLike[str]) -> None:
        self.image = os.fspath(image)
        self._lib = ext2.lib()
        self._fs = ctypes.c_void_p()
        ext2.call(
            self._lib.ext2fs_open, f"cannot open the ext4 file system in {self.image}",
            os.fsencode(self.image), ext2.FLAG_RW | ext2.FLAG_64BITS | ext2.FLAG_MASTER_SB_ONLY,
            0, 0, ext2.unix_io_manager(), ctypes.byref(self._fs),
        )
        try:
            image_stat = os.stat(self.image)
            #: the image file libext2fs has open (for switch_to)
            self._identity = (image_stat.st_dev, image_stat.st_ino)
            self._call("read_bitmaps", self._fs)
            # struct_ext2_filsys starts: magic, io, flags, device_name, super, blocksize
            words = ctypes.cast(self._fs, ctypes.POINTER(ctypes.c_void_p))
            self._io = ctypes.c_void_p(words[1])
            sb = ctypes.cast(ctypes.c_void_p(words[4]), ctypes.POINTER(ctypes.c_uint8 * 1024)).contents
            if bytes(sb[56:58]) != b"\x53\xef":
                raise OSError(errno.EINVAL, "not an ext4 superblock", self.image)
            self.block_size = 1024 << int.from_bytes(bytes(sb[24:28]), "little")
            self._inode_size_on_disk = int.from_bytes(bytes(sb[88:90]), "little") or 128
            self._inode_size = min(self._inode_size_on_disk, ctypes.sizeof(Inode))
            self._extents = bool(int.from_bytes(bytes(sb[96:100]), "little") & _INCOMPAT_EXTENTS)
        except BaseException:
            self.abandon()
            raise
        #: directory path -> inode, followed through symlinks (forgotten on every removal)
        self._dirs: dict[str, int] = {"/": ext2.ROOT_INO}
        #: directory inode -> its entries (name -> inode), once listed: libext2fs looks a
        #: name up by reading the whole (unindexed) directory, per lookup
        self._entries: dict[int, dict[bytes, int]] = {}
        #: directories whose entries changed: their mtime and ctime become "now" at close,
        #: as the kernel does on each change (unless a utime sets them first)
        self._changed: set[int] = set()
        #: directory entries ext2fs_link has read so far (see _LINK_SCAN_BUDGET)
        self._link_scans = 0
        #: a whole on-disk inode, for writing new ones (_write_new)
        self._new_inode_buffer = ctypes.create_string_buffer(self._inode_size_on_disk)
        self._generation = int.from_bytes(os.urandom(4), "little")

    # -- a chain of images ---------------------------------------------------------------

    def flush(self) -> None:
        """Write everything back (no fsync) and stay open."""
        self._touch_changed()
        self._call("flush2", self._fs, ext2.FLUSH_NO_SYNC)
        # flush2 leaves the I/O channel's block cache to its close (or to an fsync'ing
        # io_channel_flush): a read of more than 4 blocks writes its dirty blocks first
        scratch = ctypes.create_string_buffer(_CACHE_FLUSHING_READ * self.block_size)
        code = self._lib.io_channel_read_blk64(self._io, 0, _CACHE_FLUSHING_READ, scratch)
        if code:
            raise ext2.failure(code, f"writing the ext4 file system in {self.image}")

    def _io_fd(self) -> int | None:
        """The descriptor libext2fs opened the image with (its I/O channel's)."""
        found = []
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                st = os.fstat(int(name))
                if (st.st_dev, st.st_ino) == self._identity and stat.S_ISREG(st.st_mode):
                    found.append(int(name))
        return found[0] if len(found) == 1 else None

    def switch_to(self, fd: int, name: str) -> bool:
        """Go on in the image open on ``fd``, a copy of this one as last flushed; False
        (nothing changed) unless it starts with the very same superblock and this
        image's I/O descriptor is found.  ``fd`` stays the caller's."""
        io_fd = self._io_fd()
        words = ctypes.cast(self._fs, ctypes.POINTER(ctypes.c_void_p))
        ours = ctypes.string_at(words[4], 1024)
        if io_fd is None or os.pread(fd, 1024, 1024) != ours:
            return False
        os.dup2(fd, io_fd, inheritable=False)
        new = os.fstat(fd)
        self._identity = (new.st_dev, new.st_ino)
        self.image = name
        self._link_scans = 0
        return True

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, fn: str, *args: object, what: str = "") -> None:
        code = ext2.function(fn)(*args)
        if code:
            raise ext2.failure(code, what or f"{fn} in {self.image}")

    def close(self) -> None:
        """Write everything back (superblock, group descriptors, bitmaps) and close."""
        if self._fs:
            self._touch_changed()
            fs, self._fs = self._fs, ctypes.c_void_p()
            self._dirs.clear()
            # no fsync here: the snapshot's commit fsyncs the disk (and a disk that is
            # not committed is discarded)
            code = self._lib.ext2fs_close2(fs, ext2.FLUSH_NO_SYNC)
            if code:
                self._lib.ext2fs_free(fs)  # close2 frees it only once it wrote it all
                raise ext2.failure(code, f"writing the ext4 file system in {self.image}")

    def _touch_changed(self) -> None:
        now = time.time_ns()
        for directory in sorted(self._changed):
            inode = self.read_inode(directory)
            _set_time(inode, "m", now)
            _set_time(inode, "c", now)
            self.write_inode(directory, inode)
        self._changed.clear()

    def abandon(self) -> None:
        """Close without writing the metadata back: the image is to be discarded."""
        if self._fs:
            fs, self._fs = self._fs, ctypes.c_void_p()
            self._lib.ext2fs_free(fs)

    def __enter__(self) -> Ext4Tree:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def read_inode(self, ino: int) -> Inode:
        inode = Inode()
        self._call("read_inode_full", self._fs, ino, ctypes.byref(inode), self._inode_size)
        return inode

    def write_inode(self, ino: int, inode: Inode) -> None:
        self._call("write_inode_full", self._fs, ino, ctypes.byref(inode), self._inode_size)

    def _dir(self, path: str) -> int:
        """The inode of directory ``path``, following symlinks inside the image (as the
        kernel does in a chroot: ``..`` of the root is the root, an absolute target
        starts there, 40 links at most).

        Resolved from the deepest prefix of ``path`` resolved before (``_dirs``), so that
        a layer's entries, which come parents first, cost one lookup each: resolving
        every path from the root (``ext2fs_namei``) made a tree 2,000 levels deep take
        minutes."""
        ino = self._dirs.get(path)
        if ino is not None:
            return ino
        # the deepest known prefix, and the components after it
        rest: list[str] = []
        prefix = path
        while prefix not in self._dirs:
            prefix, _, name = prefix.rpartition("/")
            prefix = prefix or "/"
            rest.append(name)
        # a stack of (component, the lexical prefix it completes: None inside a link's target)
        todo: list[tuple[bytes, str | None]] = []
        lexical = prefix
        for name in reversed(rest):
            lexical = f"{lexical.rstrip('/')}/{name}"
            todo.append((_encode(name), lexical))
        todo.reverse()
        current = self._dirs[prefix]
        links = 0
        while todo:
            name, completes = todo.pop()
            if name in (b"", b"."):
                pass
            elif name == b"..":
                current = self._parent(current)
            else:
                if len(name) > _NAME_MAX:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
                found = self._lookup(current, name)
                if found is None:
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                inode = self.read_inode(found)
                if stat.S_ISLNK(inode.i_mode):
                    links += 1
                    if links > _MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = self._readlink(found, inode)
                    if target.startswith(b"/"):
                        current = ext2.ROOT_INO
                    # the target's components first; this component is done after them
                    todo.append((b"", completes))
                    todo.extend((part, None) for part in reversed(target.split(b"/")))
                    continue
                if not stat.S_ISDIR(inode.i_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                current = found
            if completes is not None:
                self._dirs[completes] = current
        return current

    def _forget_paths(self) -> None:
        """After a removal: what a path names may have changed (its directory, or a
        symlink on its way, is gone)."""
        self._dirs = {"/": ext2.ROOT_INO}

    def _parent(self, directory: int) -> int:
        out = ext2.ino_t()
        self._call("lookup", self._fs, directory, b"..", 2, None, ctypes.byref(out))
        return out.value

    def _readlink(self, ino: int, inode: Inode) -> bytes:
        size = inode.i_size
        if self._lib.ext2fs_is_fast_symlink(ctypes.byref(inode)):
            return ctypes.string_at(ctypes.addressof(inode.i_block), min(size, 60))
        file = ctypes.c_void_p()
        self._call("file_open", self._fs, ino, 0, ctypes.byref(file))
        try:
            buf = ctypes.create_string_buffer(size)
            got = ctypes.c_uint()
            self._call("file_read", file, buf, size, ctypes.byref(got))
        finally:
            self._lib.ext2fs_file_close(file)
        return buf.raw[:got.value]

    def _lookup(self, directory: int, name: bytes) -> int | None:
        entries = self._entries.get(directory)
        if entries is None:
            entries = self._entries[directory] = {n: i for n, i, _ in self._children(directory)}
        return entries.get(name)

    def _entry(self, path: str) -> tuple[int, bytes, int | None]:
        """``path``'s directory, its name there and its inode (None: no such entry)."""
        parent, name = _split(path)
        directory = self._dir(parent)
        return directory, name, self._lookup(directory, name)

    def _existing(self, path: str) -> int:
        """The inode ``path`` names, its last component not followed."""
        if path == "/":
            return ext2.ROOT_INO
        _, _, ino = self._entry(path)
        if ino is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return ino

    def _free_slot(self, path: str) -> tuple[int, bytes]:
        """``path``'s directory and name, for a new entry (EEXIST if there is one)."""
        directory, name, ino = self._entry(path)
        if ino is not None:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        return directory, name

    def _link(self, directory: int, name: bytes, ino: int, file_type: int) -> None:
        """Add an entry, growing the directory by a block when it is full."""
        self._link_scans += len(self._entries.get(directory, ()))
        if self._link_scans > _LINK_SCAN_BUDGET:
            raise NeedsKernel(
                "the layer puts too many entries in one directory to be written through "
                "libext2fs in reasonable time"
            )
        for _ in range(2):
            code = self._lib.ext2fs_link(self._fs, directory, name, ino, file_type)
            if code == 0:
                self._entries.setdefault(directory, {})[name] = ino
                self._changed.add(directory)
                return
            err = ext2.failure(code, name.decode("utf-8", "replace"))
            if err.errno != errno.ENOSPC or ext2.message(code) != "No free space in the directory":
                raise err
            self._call("expand_dir", self._fs, directory)
        raise err

    def _new_ino(self, directory: int, mode: int) -> int:
        out = ext2.ino_t()
        self._call("new_inode", self._fs, directory, mode, None, ctypes.byref(out))
        return out.value

    def _stamp(self, inode: Inode, *, created: bool = False) -> None:
        now = _time_fields(time.time_ns())
        inode.i_ctime, inode.i_ctime_extra = now
        if created:
            inode.i_atime, inode.i_atime_extra = now
            inode.i_mtime, inode.i_mtime_extra = now
            inode.i_crtime, inode.i_crtime_extra = now

    def _create_inode(
        self, path: str, mode: int, file_type: int, *, device: int | None = None,
        target: bytes | None = None, meta: Meta | None = None,
    ) -> int:
        """A new regular file, fifo, device node or fast symlink (``target``) at ``path``,
        its inode written once: root-owned and stamped now unless ``meta`` says else."""
        directory, name = self._free_slot(path)
        ino = self._new_ino(directory, mode)
        inode = Inode()
        inode.i_mode = mode
        inode.i_links_count = 1
        if stat.S_ISREG(mode) and self._extents:
            inode.i_flags = ext2.EXTENTS_FL
            # an empty extent tree: magic, 0 entries, room for 4, depth 0
            inode.i_block[0] = 0xF30A
            inode.i_block[1] = 4
        elif device is not None:
            major, minor = os.major(device), os.minor(device)
            if major < 256 and minor < 256:
                inode.i_block[0] = (major << 8) | minor
            else:
                inode.i_block[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        elif target is not None:
            ctypes.memmove(ctypes.addressof(inode.i_block), target, len(target))
            inode.i_size = len(target)
        self._stamp(inode, created=True)
        if meta is not None:
            _set_owner(inode, meta.uid, meta.gid)
            if meta.mode is not None:
                inode.i_mode = stat.S_IFMT(mode) | (meta.mode & 0o7777)
            if meta.ns is not None:
                _set_time(inode, "a", meta.ns)
                _set_time(inode, "m", meta.ns)
        self._write_new(ino, inode)
        self._lib.ext2fs_inode_alloc_stats2(self._fs, ino, 1, 0)
        self._link(directory, name, ino, file_type)
        return ino

    def _write_new(self, ino: int, inode: Inode) -> None:
        """Write a new inode whole: what ext2fs_write_new_inode does (the rest of the
        on-disk inode zeroed, the extra fields' size, a generation number), in one call
        that keeps the times' nanoseconds."""
        inode.i_extra_isize = ctypes.sizeof(Inode) - 128 if self._inode_size > 128 else 0
        self._generation = (self._generation + 0x9E3779B1) & 0xFFFFFFFF
        inode.i_generation = self._generation
        full = self._new_inode_buffer
        ctypes.memset(full, 0, len(full))
        ctypes.memmove(full, ctypes.addressof(inode), min(ctypes.sizeof(Inode), len(full)))
        self._call("write_inode_full", self._fs, ino, ctypes.cast(full, ctypes.POINTER(Inode)),
                   len(full))  # fmt: skip

    # -- Tree ----------------------------------------------------------------------------

    def lstat(self, path: str) -> Ext4Stat:
        ino = self._existing(path)
        return Ext4Stat(self.read_inode(ino).i_mode, ino)

    def is_dir(self, path: str) -> bool:
        try:
            self._dir(path)
        except OSError:
            return False
        return True

    def mkdir(self, path: str, mode: int) -> None:
        directory, name = self._free_slot(path)
        ino = self._new_ino(directory, stat.S_IFDIR | mode)
        links = self.read_inode(directory).i_links_count
        if links >= _LINK_MAX:
            # the kernel's limit for an unhashed directory (ours are: past it, only a
            # hashed one counts its subdirectories as 1, ext4's dir_nlink)
            raise OSError(errno.EMLINK, os.strerror(errno.EMLINK), path)
        # no name: ext2fs_mkdir would not grow a full parent; _link does
        self._call("mkdir", self._fs, directory, ino, None)
        if links == 1:
            # a (hashed) directory past 65,000 subdirectories, from a layer the kernel
            # applied: it stays at 1, where ext2fs_mkdir counted one more
            parent = self.read_inode(directory)
            parent.i_links_count = 1
            self.write_inode(directory, parent)
        inode = self.read_inode(ino)
        inode.i_mode = stat.S_IFDIR | mode
        self._stamp(inode, created=True)
        self.write_inode(ino, inode)
        self._entries[ino] = {}
        self._link(directory, name, ino, ext2.FT_DIR)
        self._dirs[path] = ino

    def create_file(self, path: str) -> Ext4File:
        return Ext4File(self, self._create_inode(path, stat.S_IFREG | 0o600, ext2.FT_REG_FILE))

    def symlink(self, target: str, path: str, meta: Meta | None = None) -> None:
        raw = _encode(target)
        if len(raw) >= self.block_size:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
        if len(raw) < _FAST_SYMLINK_MAX:  # in the inode itself
            self._create_inode(path, stat.S_IFLNK | 0o777, ext2.FT_SYMLINK, target=raw, meta=meta)
            return
        directory, name = self._free_slot(path)
        ino = self._new_ino(directory, stat.S_IFLNK | 0o777)
        self._call("symlink", self._fs, directory, ino, None, raw)
        inode = self.read_inode(ino)
        self._stamp(inode, created=True)
        self.write_inode(ino, inode)
        self._link(directory, name, ino, ext2.FT_SYMLINK)
        if meta is not None:
            self.chown(path, meta.uid, meta.gid)
            if meta.ns is not None:
                self.utime(path, meta.ns)

    def link(self, target: str, path: str) -> None:
        ino = self._existing(target)
        inode = self.read_inode(ino)
        if stat.S_ISDIR(inode.i_mode):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), target)
        if inode.i_links_count >= _LINK_MAX:
            raise OSError(errno.EMLINK, os.strerror(errno.EMLINK), target)
        directory, name = self._free_slot(path)
        self._link(directory, name, ino, _file_type(inode.i_mode))
        inode = self.read_inode(ino)
        inode.i_links_count += 1
        self._stamp(inode)
        self.write_inode(ino, inode)

    def mkfifo(self, path: str, mode: int, meta: Meta | None = None) -> None:
        self._create_inode(path, stat.S_IFIFO | (mode & 0o7777), ext2.FT_FIFO, meta=meta)

    def mknod(self, path: str, mode: int, device: int, meta: Meta | None = None) -> None:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        file_type = ext2.FT_CHRDEV if kind == stat.S_IFCHR else ext2.FT_BLKDEV
        self._create_inode(path, mode, file_type, device=device, meta=meta)

    def unlink(self, path: str) -> None:
        directory, name, ino = self._entry(path)
        if ino is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if stat.S_ISDIR(self.read_inode(ino).i_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        self._forget_paths()  # a symlink among the cached paths' components may be going
        self._unlink(directory, name, ino)
        self._drop_link(ino)

    def remove_tree(self, path: str) -> None:
        directory, name, top = self._entry(path)
        if top is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if not stat.S_ISDIR(self.read_inode(top).i_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        self._forget_paths()
        self._unlink(directory, name, top)
        parent = self.read_inode(directory)
        if parent.i_links_count > 2:
            parent.i_links_count -= 1  # the removed directory's ".."
        self.write_inode(directory, parent)
        # Unlinked whole: its entries need not be removed one by one, only their inodes
        # released.  A loop, not recursion: a tree may be thousands of levels deep.
        pending = [top]
        while pending:
            current = pending.pop()
            for _name, ino, is_dir in self._children(current):
                if is_dir:
                    pending.append(ino)
                else:
                    self._drop_link(ino)
            self._free(current, self.read_inode(current), is_dir=True)

    def listdir(self, path: str) -> list[tuple[str, bool]]:
        ino = self._existing(path)
        if not stat.S_ISDIR(self.read_inode(ino).i_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return [(os.fsdecode(name), is_dir) for name, _ino, is_dir in self._children(ino)]

    def chown(self, path: str, uid: int, gid: int) -> None:
        ino = self._existing(path)
        inode = self.read_inode(ino)
        _set_owner(inode, uid, gid)
        self._stamp(inode)
        self.write_inode(ino, inode)

    def chmod(self, path: str, mode: int) -> None:
        ino = self._existing(path)
        inode = self.read_inode(ino)
        inode.i_mode = stat.S_IFMT(inode.i_mode) | (mode & 0o7777)
        self._stamp(inode)
        self.write_inode(ino, inode)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.set_xattr(self._existing(path), name, value, path)

    def listxattr(self, path: str) -> list[str]:
        names: list[str] = []

        def collect(key: bytes, _value: object, _size: int, _data: object) -> int:
            names.append(os.fsdecode(key))
            return 0

        with self._xattrs(self._existing(path), path) as handle:
            self._call("xattrs_iterate", handle, ext2.XATTR_ITERATE_FUNC(collect), None, what=path)
        return names

    def removexattr(self, path: str, name: str) -> None:
        with self._xattrs(self._existing(path), path) as handle:
            self._call("xattr_remove", handle, _encode(name), what=path)

    def utime(self, path: str, ns: int) -> None:
        ino = self._existing(path)
        self._changed.discard(ino)  # its entries' changes are older than this time
        inode = self.read_inode(ino)
        _set_time(inode, "a", ns)
        _set_time(inode, "m", ns)
        self._stamp(inode)
        self.write_inode(ino, inode)

    # -- used by Ext4File and the methods above ------------------------------------------

    def set_xattr(self, ino: int, name: str, value: bytes, path: str) -> None:
        if not name.startswith(_XATTR_PREFIXES) and name not in _XATTR_NAMES:
            # a namespace ext4 does not have: the kernel refuses it so
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
        inode = self.read_inode(ino)
        mode = inode.i_mode
        if name.startswith("user.") and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            # as the kernel: user.* only on regular files and directories
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), path)
        if name in _XATTR_NAMES:
            if stat.S_ISLNK(mode):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
            if name == "system.posix_acl_default" and not stat.S_ISDIR(mode):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
            bits, equivalent = acl_mode(value, path)
            if name == "system.posix_acl_access":
                # as the kernel: the ACL's owner, mask (or group) and other entries are the
                # mode's bits, and an ACL that says no more than the mode is not kept
                inode.i_mode = (mode & ~0o777) | bits
                self._stamp(inode)
                self.write_inode(ino, inode)
                if equivalent:
                    with self._xattrs(ino, path) as handle:
                        code = self._lib.ext2fs_xattr_remove(handle, _encode(name))
                    if code and ext2.failure(code, path).errno != errno.ENODATA:
                        raise ext2.failure(code, path)
                    return
        with self._xattrs(ino, path) as handle:
            self._call("xattr_set", handle, _encode(name), value, len(value), what=path)

    def _xattrs(self, ino: int, path: str) -> _XattrHandle:
        return _XattrHandle(self, ino, path)

    def _unlink(self, directory: int, name: bytes, ino: int) -> None:
        self._call("unlink", self._fs, directory, name, ino, 0)
        entries = self._entries.get(directory)
        if entries is not None:
            entries.pop(name, None)
        self._changed.add(directory)

    def _children(self, directory: int) -> list[tuple[bytes, int, bool]]:
        out: list[tuple[bytes, int, bool]] = []

        def collect(_dir: int, _entry: int, dirent: ctypes._Pointer[ext2.DirEntry], _offset: int,
                    _blocksize: int, _buf: object, _priv: object) -> int:
            d = dirent.contents
            length = d.name_len & 0xFF
            name = ctypes.string_at(ctypes.addressof(d) + 8, length)
            if name not in (b".", b".."):
                out.append((name, d.inode, (d.name_len >> 8) == ext2.FT_DIR))
            return 0

        self._call("dir_iterate2", self._fs, directory, 0, None, ext2.DIR_ITERATE_FUNC(collect), None)
        return out

    def _drop_link(self, ino: int) -> None:
        inode = self.read_inode(ino)
        if inode.i_links_count > 1:
            inode.i_links_count -= 1
            self._stamp(inode)
            self.write_inode(ino, inode)
        else:
            self._free(ino, inode, is_dir=False)

    def _free(self, ino: int, inode: Inode, *, is_dir: bool) -> None:
        """Release an inode no entry names any more: its blocks, its xattr block, itself."""
        if self._lib.ext2fs_inode_has_valid_blocks2(self._fs, ctypes.byref(inode)):
            self._call("punch", self._fs, ino, ctypes.byref(inode), None, 0, (1 << 64) - 1)
            inode = self.read_inode(ino)
        if inode.i_file_acl or inode.l_i_file_acl_high:
            self._call("free_ext_attr", self._fs, ino, ctypes.byref(inode))
            inode = self.read_inode(ino)
        if is_dir:  # its number may come back for a new directory
            self._entries.pop(ino, None)
            self._changed.discard(ino)
        inode.i_links_count = 0
        inode.i_dtime = int(time.time()) & 0xFFFFFFFF
        self.write_inode(ino, inode)
        self._lib.ext2fs_inode_alloc_stats2(self._fs, ino, -1, 1 if is_dir else 0)

    def write_blocks(self, ino: int, first: int, data: bytes, start: int, end: int) -> None:
        """Allocate logical blocks ``first``... of file ``ino`` and write ``data[start:end]``
        (whole blocks) there."""
        bs = self.block_size
        count = (end - start) // bs
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        self._call(
            "fallocate", self._fs, ext2.FALLOCATE_FORCE_INIT | ext2.FALLOCATE_INIT_BEYOND_EOF,
            ino, None, (1 << 64) - 1, first, count,
        )
        for logical, physical, n in self._extents_of(ino, first, count):
            # through the library's I/O channel: its block cache stays coherent (a block
            # freed earlier in this layer may still sit there)
            address = ctypes.c_void_p(base + start + (logical - first) * bs)
            code = self._lib.io_channel_write_blk64(self._io, physical, n, address)
            if code:
                raise ext2.failure(code, f"writing file data to {self.image}")

    def _extents_of(self, ino: int, first: int, count: int) -> list[tuple[int, int, int]]:
        """Where logical blocks ``first``... (``count``, allocated) of file ``ino`` are:
        (logical, physical, length) runs.  Read from the inode's extent tree where it is
        all in the inode (up to four extents), else block by block (ext2fs_bmap2)."""
        inode = self.read_inode(ino)
        words = inode.i_block
        header_magic, entries, depth = words[0] & 0xFFFF, words[0] >> 16, words[1] >> 16
        if inode.i_flags & ext2.EXTENTS_FL and header_magic == 0xF30A and depth == 0 and entries <= 4:
            runs = []
            end = first + count
            for k in range(entries):
                logical = words[3 + 3 * k]
                length = words[4 + 3 * k] & 0xFFFF
                physical = (words[4 + 3 * k] >> 16) << 32 | words[5 + 3 * k]
                if length > 32768:  # an unwritten extent: not what fallocate made here
                    break
                lo, hi = max(logical, first), min(logical + length, end)
                if lo < hi:
                    runs.append((lo, physical + (lo - logical), hi - lo))
            if sum(n for _, _, n in runs) == count:
                return runs
        return self._mapped(ino, first, count)

    def _mapped(self, ino: int, first: int, count: int) -> list[tuple[int, int, int]]:
        runs: list[tuple[int, int, int]] = []
        phys = ext2.blk64_t()
        i = 0
        while i < count:
            self._call("bmap2", self._fs, ino, None, None, 0, first + i, None, ctypes.byref(phys))
            first_phys = phys.value
            n = 1
            while i + n < count:
                self._call("bmap2", self._fs, ino, None, None, 0, first + i + n, None, ctypes.byref(phys))
                if phys.value != first_phys + n:
                    break
                n += 1
            if first_phys == 0:
                raise OSError(errno.EIO, "a block just allocated is not mapped", self.image)
            runs.append((first + i, first_phys, n))
            i += n
        return runs


class _XattrHandle:
    def __init__(self, tree: Ext4Tree, ino: int, path: str) -> None:
        self.tree, self.ino, self.path = tree, ino, path
        self.handle = ctypes.c_void_p()

    def __enter__(self) -> ctypes.c_void_p:
        t = self.tree
        t._call("xattrs_open", t._fs, self.ino, ctypes.byref(self.handle), what=self.path)
        try:
            t._call("xattrs_read", self.handle, what=self.path)
        except BaseException:
            t._lib.ext2fs_xattrs_close(ctypes.byref(self.handle))
            raise
        return self.handle

    def __exit__(self, *exc: object) -> None:
        self.tree._lib.ext2fs_xattrs_close(ctypes.byref(self.handle))


# POSIX ACL tags (the xattr's entries: tag u16, perm u16, id u32, after a u32 version 2)
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 8, 16, 32


def acl_mode(value: bytes, path: str) -> tuple[int, bool]:
    """The permission bits a POSIX ACL xattr gives a file, and whether it says no more than
    they do (no named entries, no mask).  EINVAL for a malformed one, as the kernel."""
    invalid = OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
    if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != 2:
        raise invalid
    seen: dict[int, int] = {}
    named = False
    for offset in range(4, len(value), 8):
        tag = int.from_bytes(value[offset:offset + 2], "little")
        perm = int.from_bytes(value[offset + 2:offset + 4], "little")
        if perm & ~7 or tag not in (_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP,
                                    _ACL_MASK, _ACL_OTHER):
            raise invalid
        if tag in (_ACL_USER, _ACL_GROUP):
            named = True
        elif tag in seen:
            raise invalid
        else:
            seen[tag] = perm
    if not {_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER} <= seen.keys() or (named and _ACL_MASK not in seen):
        raise invalid
    group = seen.get(_ACL_MASK, seen[_ACL_GROUP_OBJ])
    bits = seen[_ACL_USER_OBJ] << 6 | group << 3 | seen[_ACL_OTHER]
    return bits, not named and _ACL_MASK not in seen


def _file_type(mode: int) -> int:
    return {
        stat.S_IFREG: ext2.FT_REG_FILE, stat.S_IFDIR: ext2.FT_DIR, stat.S_IFLNK: ext2.FT_SYMLINK,
        stat.S_IFCHR: ext2.FT_CHRDEV, stat.S_IFBLK: ext2.FT_BLKDEV, stat.S_IFIFO: ext2.FT_FIFO,
        stat.S_IFSOCK: ext2.FT_SOCK,
    }.get(stat.S_IFMT(mode), 0)


def _set_owner(inode: Inode, uid: int, gid: int) -> None:
    inode.i_uid, inode.l_i_uid_high = uid & 0xFFFF, uid >> 16
    inode.i_gid, inode.l_i_gid_high = gid & 0xFFFF, gid >> 16


def _set_time(inode: Inode, which: str, ns: int) -> None:
    low, extra = _time_fields(ns)
    setattr(inode, f"i_{which}time", low)
    setattr(inode, f"i_{which}time_extra", extra)


class Ext4File:
    """A new regular file: its data written in whole blocks (zero blocks left out:
    holes), its metadata kept until ``close`` writes the inode (xattrs set at once)."""

    def __init__(self, tree: Ext4Tree, ino: int) -> None:
        self.tree = tree
        self.ino = ino
        self.holes = 0
        self.offset = 0  # where the next write lands
        self._start = 0  # file offset of _pending[0] (block-aligned)
        self._pending = bytearray()
        self._size: int | None = None
        self._owner = (0, 0)
        self._mode = 0o600
        self._time: int | None = None

    def write(self, buf: bytes, start: int, end: int) -> None:
        if self.offset != self._start + len(self._pending):
            self._skip_to(self.offset)
        self._pending += memoryview(buf)[start:end]
        self.offset += end - start
        if len(self._pending) >= _FLUSH:
            self._flush(final=False)

    def seek(self, offset: int) -> None:
        if offset < self.offset:
            raise OSError(errno.EINVAL, "a new file is written front to back", str(self.ino))
        self.offset = offset

    def finish(self, size: int) -> None:
        self._size = size

    def chown(self, uid: int, gid: int) -> None:
        self._owner = (uid, gid)

    def chmod(self, mode: int) -> None:
        self._mode = mode & 0o7777

    def setxattr(self, name: str, value: bytes) -> None:
        """Set now (its errors belong to this call), after the owner and mode so far: an
        ACL changes the mode, as after the kernel's chmod."""
        tree = self.tree
        inode = tree.read_inode(self.ino)
        inode.i_mode = stat.S_IFREG | self._mode
        _set_owner(inode, *self._owner)
        tree.write_inode(self.ino, inode)
        tree.set_xattr(self.ino, name, value, f"inode {self.ino}")
        self._mode = tree.read_inode(self.ino).i_mode & 0o7777

    def utime(self, ns: int) -> None:
        self._time = ns

    def close(self) -> None:
        """The rest of the data, then the inode."""
        tree = self.tree
        self._flush(final=True)
        inode = tree.read_inode(self.ino)
        size = self._size if self._size is not None else self.offset
        inode.i_size, inode.i_size_high = size & 0xFFFFFFFF, size >> 32
        inode.i_mode = stat.S_IFREG | self._mode
        _set_owner(inode, *self._owner)
        if self._time is not None:
            _set_time(inode, "a", self._time)
            _set_time(inode, "m", self._time)
        tree.write_inode(self.ino, inode)

    def _skip_to(self, offset: int) -> None:
        """Continue at ``offset`` (past the data so far): zeros within the current block,
        a hole beyond it."""
        bs = self.tree.block_size
        end = self._start + len(self._pending)
        block_end = -(-end // bs) * bs
        if offset <= block_end:
            self._pending += bytes(offset - end)
            return
        self._pending += bytes(block_end - end)
        self._flush(final=False)
        self._start = offset // bs * bs
        self._pending = bytearray(offset - self._start)

    def _flush(self, *, final: bool) -> None:
        bs = self.tree.block_size
        if final:
            self._pending += bytes(-len(self._pending) % bs)
        whole = len(self._pending) // bs * bs
        if not whole:
            return
        data = bytes(self._pending[:whole])
        written = 0
        for s, e in data_extents(data, 0, whole, self._start):
            self.tree.write_blocks(self.ino, (self._start + s) // bs, data, s, e)
            written += e - s
        self.holes += whole - written
        del self._pending[:whole]
        self._start += whole

