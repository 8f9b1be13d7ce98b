"""Writing file data with holes where the data has aligned runs of zeros (pure + pwrite)."""

from __future__ import annotations

import os

HOLE_BLOCK = 4096
_ZERO_BLOCK = bytes(HOLE_BLOCK)


def data_extents(buf: bytes, start: int, end: int, file_offset: int) -> list[tuple[int, int]]:
    """The sub-ranges of ``buf[start:end]`` to write; the rest are whole zero blocks,
    aligned to ``HOLE_BLOCK`` in the file (``buf[start]`` lands at ``file_offset``),
    which are left as holes.

    ``bytes.find`` of a zero block runs at memchr speed over ordinary data, so the
    common case (no zero block at all) costs one C-level scan.
    """
    if start >= end:
        return []
    i = buf.find(_ZERO_BLOCK, start, end)
    if i < 0:
        return [(start, end)]
    out: list[tuple[int, int]] = []
    pending = start
    while i >= 0:
        # first block boundary (in file terms) at or after i
        a = i + (-(file_offset + i - start) % HOLE_BLOCK)
        b = a
        while b + HOLE_BLOCK <= end and buf.startswith(_ZERO_BLOCK, b):
            b += HOLE_BLOCK
        if b > a:
            if a > pending:
                out.append((pending, a))
            pending = b
            i = buf.find(_ZERO_BLOCK, b, end)
        else:
            # The zero run found at i ends before the next boundary's block is
            # complete, so any aligned zero block starts after this run.
            i = buf.find(_ZERO_BLOCK, a + 1, end)
    if pending < end:
        out.append((pending, end))
    return out


class SparseWriter:
    """pwrite() the non-zero parts of a stream of chunks; ``finish`` sets the final size."""

    __slots__ = ("fd", "offset", "holes")

    def __init__(self, fd: int, offset: int = 0) -> None:
        self.fd = fd
        self.offset = offset
        self.holes = 0  # bytes left as holes

    def write(self, buf: bytes, start: int, end: int) -> None:
        fd = self.fd
        base = self.offset
        view = memoryview(buf)
        written = 0
        for s, e in data_extents(buf, start, end, base):
            off = base + (s - start)
            written += e - s
            while s < e:
                n = os.pwrite(fd, view[s:e], off)
                s += n
                off += n
        self.holes += (end - start) - written
        self.offset = base + (end - start)

    def seek(self, offset: int) -> None:
        self.offset = offset

    def finish(self, size: int) -> None:
        """Extend (or keep) the file to ``size``: trailing holes are not written."""
        os.ftruncate(self.fd, size)
