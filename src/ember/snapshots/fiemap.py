"""Disk usage of a file, including how much of it is shared with reflink clones.

``st_blocks`` counts a shared extent in every file that shares it; FIEMAP's
``SHARED`` flag tells which extents are shared, so ``exclusive`` is what
removing this one file would give back.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_SHARED = 0x2000
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
_BATCH = 512


@dataclass(frozen=True)
class FileUsage:
    apparent: int  # st_size
    allocated: int  # bytes of disk the file's extents cover
    exclusive: int  # of those, bytes no other file shares


def file_usage(path: Path) -> FileUsage:
    st = os.stat(path)
    allocated = st.st_blocks * 512
    try:
        shared = _shared_bytes(path)
    except OSError:
        shared = 0  # no FIEMAP (e.g. some network file systems): count everything as ours
    return FileUsage(st.st_size, allocated, max(allocated - shared, 0))


def _shared_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        start, shared = 0, 0
        while True:
            buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
            _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                return shared
            last = False
            for i in range(mapped):
                logical, _phys, length, _r1, _r2, flags, *_ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size
                )
                if flags & _EXTENT_SHARED:
                    shared += length
                start = logical + length
                last = bool(flags & _EXTENT_LAST)
            if last:
                return shared
    finally:
        os.close(fd)
