"""A cpio ``newc`` writer: the format the Linux kernel unpacks as an initramfs.

Pure: builds bytes in memory (initramfs archives are a few MB).  Output is
reproducible: inode numbers are assigned in order and every mtime is 0, so the
same inputs give the same archive (and the same cache key).

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
a 110-byte ASCII header ``070701`` + 13 eight-digit hex fields, the NUL-terminated
name padded to 4 bytes, the data padded to 4 bytes; ``TRAILER!!!`` ends an archive.
Archives may be concatenated; the kernel applies them in order.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_MAX_FIELD = 0xFFFFFFFF


class CpioError(ValueError):
    """A name or value that cannot go into a newc archive."""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _check_name(name: str) -> bytes:
    if not name or name.startswith("/") or name.endswith("/"):
        raise CpioError(f"cpio member name {name!r} must be relative and non-empty")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or name == TRAILER:
        raise CpioError(f"cpio member name {name!r} is not a clean path")
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise CpioError(f"cpio member name {name!r} contains a NUL byte")
    return raw


@dataclass
class CpioWriter:
    """Collects members and renders one archive (with its trailer) via ``getvalue``."""

    _buf: bytearray = field(default_factory=bytearray)
    _ino: int = 0
    _names: set[str] = field(default_factory=set)
    _closed: bool = False

    def _member(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        uid: int = 0,
        gid: int = 0,
        rdev: tuple[int, int] = (0, 0),
        check_name: bool = True,
    ) -> None:
        if self._closed:
            raise CpioError("archive already finished")
        raw = _check_name(name) if check_name else name.encode()
        if check_name:
            if name in self._names:
                raise CpioError(f"duplicate cpio member {name!r}")
            parent = name.rpartition("/")[0]
            if parent and parent not in self._names:
                raise CpioError(f"cpio member {name!r} added before its directory {parent!r}")
            self._names.add(name)
        self._ino += 1
        values = (
            self._ino,
            mode,
            uid,
            gid,
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime: reproducible archives
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(raw) + 1,
            0,
        )
        if any(not 0 <= v <= _MAX_FIELD for v in values):
            raise CpioError(f"cpio member {name!r} has a value that does not fit newc")
        header = MAGIC + b"".join(b"%08X" % v for v in values)
        self._buf += header + raw + b"\0"
        self._buf += _pad4(len(header) + len(raw) + 1)
        self._buf += data + _pad4(len(data))

    def add_dir(self, name: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> None:
        self._member(name, stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid)

    def add_file(
        self, name: str, data: bytes, mode: int = 0o644, *, uid: int = 0, gid: int = 0
    ) -> None:
        self._member(name, stat.S_IFREG | (mode & 0o7777), data, uid=uid, gid=gid)

    def add_symlink(self, name: str, target: str) -> None:
        raw = target.encode("utf-8", "surrogateescape")
        if not raw or b"\0" in raw:
            raise CpioError(f"invalid symlink target {target!r} for {name!r}")
        self._member(name, stat.S_IFLNK | 0o777, raw)

    def add_device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        if kind not in ("c", "b"):
            raise CpioError(f"device kind must be 'c' or 'b', not {kind!r}")
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._member(name, fmt | (mode & 0o7777), rdev=(major, minor))

    def getvalue(self) -> bytes:
        """Finish the archive (trailer) and return it."""
        if not self._closed:
            self._member(TRAILER, 0, check_name=False)
            self._closed = True
        return bytes(self._buf)
