"""Disk usage of a file, including how much of it is shared with reflink clones.

``st_blocks`` counts a shared extent in every file that shares it; FIEMAP's
``SHARED`` flag tells which extents are shared, so ``exclusive`` is what
removing this one file would give back.  For several files at once (a chain
whose layers share extents with each other only), ``exclusive_bytes``
compares the physical extents of the files that go with those that stay.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
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
        shared = sum(length for _p, length, flags in _extents(path) if flags & _EXTENT_SHARED)
    except OSError:
        shared = 0  # no FIEMAP (e.g. some network file systems): count everything as ours
    return FileUsage(st.st_size, allocated, max(allocated - shared, 0))


def physical_extents(path: Path) -> list[tuple[int, int]]:
    """Where the file's data lies on its device: (physical offset, length) in bytes.
    Raises OSError (no FIEMAP, or the file is gone)."""
    return [(physical, length) for physical, length, _flags in _extents(path)]


def _extents(path: Path) -> Iterator[tuple[int, int, int]]:
    """(physical, length, flags) of each extent, after flushing delayed allocations."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = 0
        while True:
            buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
            _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                return
            last = False
            for i in range(mapped):
                logical, physical, length, _r1, _r2, flags, *_ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size
                )
                yield physical, length, flags
                start = logical + length
                last = bool(flags & _EXTENT_LAST)
            if last:
                return
    finally:
        os.close(fd)


def exclusive_bytes(
    gone: list[tuple[int, int]], kept: list[tuple[int, int]]
) -> int:
    """Bytes of the extents ``gone`` that no extent in ``kept`` overlaps: what deleting
    the files of ``gone`` gives back when the files of ``kept`` stay (reflinked
    extents are counted once, and not at all while a kept file shares them)."""
    total = 0
    merged_kept = _merge(kept)
    j = 0
    for start, end in _merge(gone):
        covered = 0
        while j < len(merged_kept) and merged_kept[j][1] <= start:
            j += 1
        k = j
        while k < len(merged_kept) and merged_kept[k][0] < end:
            covered += min(end, merged_kept[k][1]) - max(start, merged_kept[k][0])
            k += 1
        total += end - start - covered
    return total


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) ranges, sorted, overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((p, p + n) for p, n in extents if n > 0):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
