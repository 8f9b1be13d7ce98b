"""Reading a directory of an untrusted tree as a tar stream, from a chroot-ed child.

The inverse of the applier, for Docker's volume copy-up (docs/volumes.md): the
image's files at a volume's target go into the empty volume.  The tree is an
image's, so it is hostile like a layer: a symlinked parent of the target
(``/data -> /``), absolute symlinks inside it, fifos, device nodes.  So the
packer is a forked child chroot-ed into the tree's root (``sandbox.enter_root``,
with ``sandbox.detach_from_parent``'s sealed interpreter): the target is
resolved by the kernel inside the root, symlinks are archived as links and
never followed, special files are archived as headers and never opened.  Owner
and group are numeric only: a name lookup would read the image's
``/etc/passwd`` through NSS, which loads libraries from the root.

The parent gets the target's verdict first (a directory to copy, or none) on a
second pipe, then the archive on the data pipe, and at the end the packer's
error, if it had one, on the verdict pipe again.  The archive goes to the
applier (``sandbox.apply_streams``), which applies it as it applies a layer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from ember import process
from ember.unpack.errors import UnpackError
from ember.unpack.sandbox import detach_from_parent, enter_root

#: the packer's first byte: what the target is inside the root
_DIRECTORY = b"d"
_NONE = b"n"
_MESSAGE_LIMIT = 2000


@dataclass
class Packer:
    """A running packer child and the parent's ends of its pipes."""

    pid: int
    data_fd: int
    verdict_fd: int
    target: str

    # -- ChunkSource (sandbox.LayerStream.open): the archive as the applier reads it ----

    def readinto(self, buf: memoryview, /) -> int:
        return os.readv(self.data_fd, [buf])

    def settle(self) -> None:
        """The applier stopped reading: say the packer's own failure, if it had one."""
        self.finish()

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.data_fd >= 0:
            os.close(self.data_fd)
            self.data_fd = -1

    # -----------------------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for the packer (once its archive was read, or its pipe closed); raises
        UnpackError saying why it failed, if it did.  Idempotent."""
        if self.pid == 0:
            return
        self.__exit__()  # a packer still writing gets EPIPE and ends
        message = _read_all(self.verdict_fd).decode("utf-8", "replace")[:_MESSAGE_LIMIT]
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        self._close_verdict()
        if status != 0:
            why = message or f"it {_exit_text(status)}"
            raise UnpackError(f"cannot read the image's files at {self.target}: {why}")

    def kill(self) -> None:
        """Stop the packer at once (the apply failed or was interrupted).  Idempotent."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        self.__exit__()
        self._close_verdict()

    def _close_verdict(self) -> None:
        if self.verdict_fd >= 0:
            os.close(self.verdict_fd)
            self.verdict_fd = -1


def start_packer(root: str | os.PathLike[str], target: str, *, skip: Sequence[str] = ()) -> Packer | None:
    """Fork a packer chroot-ed into ``root`` for directory ``target`` (absolute, inside
    the root); None when ``target`` is no directory there (absent, a file, or a
    symlink that leads to no directory inside the root).  ``skip``: names left out
    of the archive in ``target`` itself."""
    fds: list[int] = []
    try:
        fds.append(root_fd := os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        verdict_r, verdict_w = os.pipe2(os.O_CLOEXEC)
        fds += (verdict_r, verdict_w)
        data_r, data_w = os.pipe2(os.O_CLOEXEC)
        fds += (data_r, data_w)
        pid = process.fork()
        if pid == 0:
            _packer_child(root_fd, target, frozenset(skip), verdict_w, data_w)  # never returns
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in (root_fd, verdict_w, data_w):
        os.close(fd)
    packer = Packer(pid, data_r, verdict_r, target)
    try:
        verdict = os.read(verdict_r, 1)
        if verdict == _DIRECTORY:
            return packer
        packer.finish()  # raises what it failed on, if it did
    except BaseException:
        packer.kill()
        raise
    if verdict != _NONE:
        raise UnpackError(f"cannot read the image's files at {target}: the reader ended without a word")
    return None


def _read_all(fd: int) -> bytes:
    out = b""
    while len(out) < 4 * _MESSAGE_LIMIT:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        out += chunk
    return out


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _packer_child(root_fd: int, target: str, skip: frozenset[str], verdict_w: int, data_w: int) -> None:
    """Never returns: writes the verdict, then the archive of ``target``, then ``_exit``s."""
    code = 1
    try:
        try:
            detach_from_parent({root_fd, verdict_w, data_w})
            enter_root(root_fd)
            try:
                os.chdir(target)  # resolved by the kernel inside the root
            except OSError:
                os.write(verdict_w, _NONE)
                code = 0
                return
            os.write(verdict_w, _DIRECTORY)
            with os.fdopen(data_w, "wb", buffering=1 << 20) as out:
                write_tree(out, skip)
            code = 0
        except BaseException as e:
            text = f"{getattr(e, 'strerror', None) or e}"
            filename = getattr(e, "filename", None)
            if isinstance(filename, str):
                text = f"{filename[:300]!r}: {text}"
            os.write(verdict_w, text.encode("utf-8", "replace")[:_MESSAGE_LIMIT])
    finally:
        os._exit(code)


def write_tree(out: BinaryIO, skip: frozenset[str] = frozenset()) -> None:
    """Write the tree under the working directory to ``out`` as a pax archive: the
    directory itself as ``./``, then everything below it, each directory before what
    it holds; hard links as links to the first name of their inode; sockets left out.

    Iterative (a tree may be thousands of levels deep); names in sorted order."""
    first_names: dict[tuple[int, int], str] = {}
    stack = ["."]
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        while stack:
            path = stack.pop()
            st = os.lstat(path)
            info = _header(path, st)
            if info is None:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                first = first_names.setdefault((st.st_dev, st.st_ino), path)
                if first != path:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
            if info.type == tarfile.REGTYPE:
                _add_file(tar, info, path, st)
            else:
                tar.addfile(info)
            if stat.S_ISDIR(st.st_mode):
                names = sorted(os.listdir(path), reverse=True)
                if path == ".":
                    names = [n for n in names if n not in skip]
                stack.extend(f"{path}/{name}" for name in names)


def _header(path: str, st: os.stat_result) -> tarfile.TarInfo | None:
    info = tarfile.TarInfo(path)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None  # a socket: nothing a copy could carry (Docker's copy leaves them out too)
    info.mode = stat.S_IMODE(mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 1_000_000_000
    info.pax_headers = {
        "SCHILY.xattr." + name:
            os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
        for name in os.listxattr(path, follow_symlinks=False)
    }
    return info


def _add_file(tar: tarfile.TarFile, info: tarfile.TarInfo, path: str, st: os.stat_result) -> None:
    # O_NOFOLLOW and the inode check: the file read is the one just looked at
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            raise OSError(0, "changed while it was read", path)
        if st.st_blocks * 512 >= st.st_size:
            tar.addfile(info, f)
            return
        # Holes: a GNU sparse 1.0 member holds only the data (the applier makes the holes
        # again), so the work is the file's blocks, not its size (8 GiB of `truncate`
        # took 23 s, written whole, and filled a volume)
        regions = data_regions(fd, st.st_size)
        sparse = _SparseData(fd, regions)
        info.pax_headers = {
            **info.pax_headers, "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
            "GNU.sparse.name": info.name, "GNU.sparse.realsize": str(st.st_size),
        }  # fmt: skip
        head, _, tail = info.name.rpartition("/")
        info.name = f"{head}/GNUSparseFile.0/{tail}"
        info.size = sparse.size
        tar.addfile(info, sparse)  # type: ignore[arg-type]


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of data of a file of ``size`` bytes (SEEK_DATA and
    SEEK_HOLE), ended by a (size, 0) entry when it ends in a hole, as GNU tar writes."""
    regions: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from here
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end - start))
        pos = end
    if not regions or sum(regions[-1]) < size:
        regions.append((size, 0))
    return regions


class _SparseData:
    """A GNU sparse 1.0 member's data, read as a file: the map (its entry count and
    each offset and length, one decimal a line, padded to a block), then the data runs."""

    def __init__(self, fd: int, regions: list[tuple[int, int]]) -> None:
        text = f"{len(regions)}\n" + "".join(f"{o}\n{n}\n" for o, n in regions)
        blocks = -(-len(text) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self._map = text.encode().ljust(blocks, b"\0")
        self._fd = fd
        self._runs = [r for r in regions if r[1]]
        self.size = len(self._map) + sum(n for _, n in self._runs)

    def read(self, n: int) -> bytes:
        """``n`` bytes (fewer only at the end): tarfile's copy takes a short read for an end."""
        out = bytearray()
        if self._map:
            out += self._map[:n]
            self._map = self._map[n:]
        while len(out) < n and self._runs:
            offset, length = self._runs[0]
            data = os.pread(self._fd, min(n - len(out), length), offset)
            if not data:
                raise OSError(0, "the file ended early")
            out += data
            self._runs[0] = (offset + len(data), length - len(data))
            if self._runs[0][1] == 0:
                self._runs.pop(0)
        return bytes(out)
