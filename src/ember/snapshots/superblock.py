"""A cheap, real check of an ext4 image: was it cleanly unmounted, with no errors recorded?

``e2fsck -fn`` reads every group descriptor, inode table and directory: about
15 ms even for a tiny image, and more as the image grows.  For an intermediate
layer of a chain ember verifies the superblock instead (the full check runs on
the snapshot a machine boots, see docs/snapshots.md).  What it verifies is what
the kernel itself records about the file system's health:

- the magic number, and a sane block size and block count that fit in the file;
- the superblock checksum (crc32c, with ``metadata_csum``), so a torn or
  scribbled superblock is caught;
- ``s_state``: VALID_FS (clean unmount) set, ERROR_FS and ORPHAN_FS clear;
- no ``needs_recovery`` feature (INCOMPAT_RECOVER): the journal is empty, the
  file system was not copied or left while mounted;
- no error recorded (``s_error_count``, which ext4 bumps on any detected
  corruption, and which survives a clean unmount), no orphan inode list.

Offsets are those of ``struct ext4_super_block`` (kernel documentation,
filesystems/ext4/super.rst), checked against ``debugfs -R "ssv ..."``.
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53

# s_state
VALID_FS = 0x0001
ERROR_FS = 0x0002
ORPHAN_FS = 0x0004
# features
INCOMPAT_RECOVER = 0x0004
INCOMPAT_64BIT = 0x0080
RO_COMPAT_METADATA_CSUM = 0x0400
CHECKSUM_TYPE_CRC32C = 1

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


@functools.cache
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return table


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC32C without the final inversion: the kernel's ``ext4_chksum(~0, ...)``."""
    table = _crc32c_table()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def problems(sb: bytes, file_size: int) -> list[str]:
    """What is wrong with this superblock (1024 bytes) of an unmounted ext4 image; [] if nothing."""
    if len(sb) < SUPERBLOCK_SIZE:
        return ["the image is too small to hold an ext4 superblock"]
    (magic,) = struct.unpack_from("<H", sb, 0x38)
    if magic != EXT4_MAGIC:
        return ["it does not hold an ext4 file system (bad superblock magic)"]
    out: list[str] = []
    (ro_compat,) = struct.unpack_from("<I", sb, 0x64)
    if ro_compat & RO_COMPAT_METADATA_CSUM:
        if sb[0x175] != CHECKSUM_TYPE_CRC32C:
            out.append(f"unknown superblock checksum type {sb[0x175]}")
        else:
            (stored,) = struct.unpack_from("<I", sb, 0x3FC)
            if crc32c_raw(sb[:0x3FC]) != stored:
                return ["the superblock checksum does not match (damaged superblock)"]
    (log_block,) = struct.unpack_from("<I", sb, 0x18)
    if log_block > 6:  # 1 KiB << 6 = 64 KiB, the largest ext4 block size
        return [f"impossible block size (log {log_block})"]
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    blocks = struct.unpack_from("<I", sb, 0x4)[0]
    if incompat & INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    if blocks * (1024 << log_block) > file_size:
        out.append("the file system is larger than its image (truncated image)")
    (state,) = struct.unpack_from("<H", sb, 0x3A)
    if not state & VALID_FS:
        out.append("it was not cleanly unmounted")
    if state & ERROR_FS:
        out.append("the kernel marked it as having errors")
    if state & ORPHAN_FS:
        out.append("orphan inodes were being recovered")
    if incompat & INCOMPAT_RECOVER:
        out.append("its journal needs recovery (copied or left while mounted)")
    (error_count,) = struct.unpack_from("<I", sb, 0x194)
    if error_count:
        out.append(f"{error_count} file system error(s) recorded")
    (last_orphan,) = struct.unpack_from("<I", sb, 0xE8)
    if last_orphan:
        out.append("it has an orphan inode list")
    return out


def check_image(image: Path) -> list[str]:
    """``problems`` of the ext4 file system in ``image`` (read with one pread)."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        sb = os.pread(fd, SUPERBLOCK_SIZE, SUPERBLOCK_OFFSET)
    finally:
        os.close(fd)
    return problems(sb, size)


def needs_recovery(image: Path) -> bool:
    """Whether the ext4 file system in ``image`` has a journal to replay (it was in use
    when its machine ended without unmounting it): a kernel then refuses to mount it from
    a read-only device.  False for what is not ext4 (its mount says why)."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sb = os.pread(fd, SUPERBLOCK_SIZE, SUPERBLOCK_OFFSET)
    finally:
        os.close(fd)
    if len(sb) < 0x64 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return False
    (incompat,) = struct.unpack_from("<I", sb, 0x60)
    return bool(incompat & INCOMPAT_RECOVER)
