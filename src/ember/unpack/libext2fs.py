"""The few calls of e2fsprogs' libext2fs that ``ext4tree`` needs, through ctypes.

libext2fs is the library ``mkfs.ext4 -d``, ``debugfs`` and ``fuse2fs`` write ext4
with from user space; it comes with e2fsprogs, which ember needs anyway.  This
module only declares the functions, the on-disk inode layout and the error
codes, and turns a failed call into an ``OSError`` with the errno the kernel
would have given (so that the applier's replace-not-write-through logic reads
the same on both trees).  Everything else is in ``ext4tree``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable
from typing import Any

# ext2fs_open flags (ext2fs.h)
FLAG_RW = 0x01
FLAG_MASTER_SB_ONLY = 0x200  # like the kernel: backup superblocks are left as mkfs wrote them
FLAG_64BITS = 0x20000
# ext2fs_close2 / ext2fs_flush2 flags
FLUSH_NO_SYNC = 0x1  # write, do not fsync: the snapshot's commit fsyncs the disk

# directory entry file types (ext2_fs.h): the low bits of ext2fs_link's flags
FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7

# inode flags
EXTENTS_FL = 0x80000
INDEX_FL = 0x1000

# ext2fs_fallocate flags: allocate initialized extents, also beyond i_size
FALLOCATE_FORCE_INIT = 0x2
FALLOCATE_INIT_BEYOND_EOF = 0x8

# dir_iterate: the "." and ".." entries
DIRENT_DOT_FILE = 1
DIRENT_DOT_DOT_FILE = 2

ROOT_INO = 2

ino_t = ctypes.c_uint32
blk64_t = ctypes.c_uint64
errcode_t = ctypes.c_long
_P = ctypes.c_void_p


class Inode(ctypes.Structure):
    """``struct ext2_inode_large``: the 128-byte inode and its extra fields."""

    _fields_ = [
        ("i_mode", ctypes.c_uint16),
        ("i_uid", ctypes.c_uint16),
        ("i_size", ctypes.c_uint32),
        ("i_atime", ctypes.c_uint32),
        ("i_ctime", ctypes.c_uint32),
        ("i_mtime", ctypes.c_uint32),
        ("i_dtime", ctypes.c_uint32),
        ("i_gid", ctypes.c_uint16),
        ("i_links_count", ctypes.c_uint16),
        ("i_blocks", ctypes.c_uint32),
        ("i_flags", ctypes.c_uint32),
        ("osd1", ctypes.c_uint32),
        ("i_block", ctypes.c_uint32 * 15),
        ("i_generation", ctypes.c_uint32),
        ("i_file_acl", ctypes.c_uint32),
        ("i_size_high", ctypes.c_uint32),
        ("i_faddr", ctypes.c_uint32),
        ("l_i_blocks_hi", ctypes.c_uint16),
        ("l_i_file_acl_high", ctypes.c_uint16),
        ("l_i_uid_high", ctypes.c_uint16),
        ("l_i_gid_high", ctypes.c_uint16),
        ("l_i_checksum_lo", ctypes.c_uint16),
        ("l_i_reserved", ctypes.c_uint16),
        ("i_extra_isize", ctypes.c_uint16),
        ("i_checksum_hi", ctypes.c_uint16),
        ("i_ctime_extra", ctypes.c_uint32),
        ("i_mtime_extra", ctypes.c_uint32),
        ("i_atime_extra", ctypes.c_uint32),
        ("i_crtime", ctypes.c_uint32),
        ("i_crtime_extra", ctypes.c_uint32),
        ("i_version_hi", ctypes.c_uint32),
        ("i_projid", ctypes.c_uint32),
    ]


assert ctypes.sizeof(Inode) == 160


class DirEntry(ctypes.Structure):
    """``struct ext2_dir_entry`` (name_len's high byte is the file type)."""

    _fields_ = [
        ("inode", ctypes.c_uint32),
        ("rec_len", ctypes.c_uint16),
        ("name_len", ctypes.c_uint16),
        ("name", ctypes.c_char * 255),
    ]


DIR_ITERATE_FUNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ino_t, ctypes.c_int, ctypes.POINTER(DirEntry), ctypes.c_int, ctypes.c_int,
    _P, _P,
)
XATTR_ITERATE_FUNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char), ctypes.c_size_t, _P
)

_PROTOTYPES: dict[str, list[Any]] = {
    "ext2fs_open": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint, _P, ctypes.POINTER(_P)],
    "ext2fs_read_bitmaps": [_P],
    "ext2fs_close2": [_P, ctypes.c_int],
    "ext2fs_flush2": [_P, ctypes.c_int],
    "ext2fs_lookup": [_P, ino_t, ctypes.c_char_p, ctypes.c_int, _P, ctypes.POINTER(ino_t)],
    "ext2fs_new_inode": [_P, ino_t, ctypes.c_int, _P, ctypes.POINTER(ino_t)],
    "ext2fs_write_new_inode": [_P, ino_t, ctypes.POINTER(Inode)],
    "ext2fs_read_inode_full": [_P, ino_t, ctypes.POINTER(Inode), ctypes.c_int],
    "ext2fs_write_inode_full": [_P, ino_t, ctypes.POINTER(Inode), ctypes.c_int],
    "ext2fs_link": [_P, ino_t, ctypes.c_char_p, ino_t, ctypes.c_int],
    "ext2fs_unlink": [_P, ino_t, ctypes.c_char_p, ino_t, ctypes.c_int],
    "ext2fs_mkdir": [_P, ino_t, ino_t, ctypes.c_char_p],
    "ext2fs_symlink": [_P, ino_t, ino_t, ctypes.c_char_p, ctypes.c_char_p],
    "ext2fs_expand_dir": [_P, ino_t],
    "ext2fs_fallocate": [_P, ctypes.c_int, ino_t, ctypes.POINTER(Inode), blk64_t, blk64_t, blk64_t],
    "ext2fs_bmap2": [_P, ino_t, ctypes.POINTER(Inode), _P, ctypes.c_int, blk64_t,
                     ctypes.POINTER(ctypes.c_int), ctypes.POINTER(blk64_t)],
    "ext2fs_punch": [_P, ino_t, ctypes.POINTER(Inode), _P, blk64_t, blk64_t],
    "ext2fs_free_ext_attr": [_P, ino_t, ctypes.POINTER(Inode)],
    "ext2fs_inode_has_valid_blocks2": [_P, ctypes.POINTER(Inode)],
    "ext2fs_dir_iterate2": [_P, ino_t, ctypes.c_int, _P, DIR_ITERATE_FUNC, _P],
    "ext2fs_xattrs_open": [_P, ino_t, ctypes.POINTER(_P)],
    "ext2fs_xattrs_read": [_P],
    "ext2fs_xattrs_close": [ctypes.POINTER(_P)],
    "ext2fs_xattr_set": [_P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
    "ext2fs_xattr_remove": [_P, ctypes.c_char_p],
    "ext2fs_xattrs_iterate": [_P, XATTR_ITERATE_FUNC, _P],
    "io_channel_write_blk64": [_P, ctypes.c_ulonglong, ctypes.c_int, _P],
    "io_channel_read_blk64": [_P, ctypes.c_ulonglong, ctypes.c_int, _P],
    "ext2fs_is_fast_symlink": [ctypes.POINTER(Inode)],
    "ext2fs_file_open": [_P, ino_t, ctypes.c_int, ctypes.POINTER(_P)],
    "ext2fs_file_read": [_P, _P, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint)],
    "ext2fs_file_close": [_P],
}
_VOID = {"ext2fs_inode_alloc_stats2": [_P, ino_t, ctypes.c_int, ctypes.c_int],
         "ext2fs_block_alloc_stats2": [_P, blk64_t, ctypes.c_int],
         "ext2fs_free": [_P]}
_INT = {"ext2fs_inode_has_valid_blocks2", "ext2fs_is_fast_symlink"}


class Ext2fsUnavailable(OSError):
    """libext2fs cannot be loaded (e2fsprogs' library package is missing)."""


@functools.cache
def lib() -> Any:
    """The loaded library, its prototypes declared.  (Loaded before the applier child
    seals its interpreter: sandbox imports and loads it first.)"""
    try:
        so = ctypes.CDLL("libext2fs.so.2")
        com = ctypes.CDLL("libcom_err.so.2")
    except OSError as e:
        raise Ext2fsUnavailable(
            errno.ENOENT, f"libext2fs is not installed ({e}): install e2fsprogs (Debian: libext2fs2)"
        ) from None
    for fn, args in (_PROTOTYPES | _VOID).items():
        f = getattr(so, fn)
        f.argtypes = args
        f.restype = None if fn in _VOID else (ctypes.c_int if fn in _INT else errcode_t)
    so.initialize_ext2_error_table()
    com.error_message.restype = ctypes.c_char_p
    com.error_message.argtypes = [ctypes.c_long]
    so.error_message = com.error_message
    return so


@functools.cache
def function(name: str) -> Any:
    """``ext2fs_<name>`` of the library (looked up once)."""
    return getattr(lib(), f"ext2fs_{name}")


@functools.cache
def unix_io_manager() -> ctypes.c_void_p:
    return ctypes.c_void_p.in_dll(lib(), "unix_io_manager")


@functools.cache
def _messages() -> dict[int, str]:
    text = lib().error_message
    return {code: text(code).decode("utf-8", "replace") for code in range(_ET_BASE, _ET_BASE + 256)}


_ET_BASE = 2133571328  # com_err's base of the "ext2" table

#: the errno the kernel gives where libext2fs gives these (matched by message: the
#: codes are positions in e2fsprogs' table and may move between versions)
_ERRNO_BY_MESSAGE = {
    "File not found by ext2_lookup": errno.ENOENT,
    "Ext2 inode is not a directory": errno.ENOTDIR,
    "Too many symbolic links encountered.": errno.ELOOP,
    "Ext2 directory already exists": errno.EEXIST,
    "Ext2 file already exists": errno.EEXIST,
    "Could not allocate block in ext2 filesystem": errno.ENOSPC,
    "Could not allocate inode in ext2 filesystem": errno.ENOSPC,
    "No free space in the directory": errno.ENOSPC,
    "No free space in extent map": errno.ENOSPC,
    "Insufficient space to store extended attribute data": errno.ENOSPC,
    "Attempt to write block to filesystem resulted in short write": errno.EIO,
    "Attempt to read block from filesystem resulted in short read": errno.EIO,
    "Ext2 file too big": errno.EFBIG,
    "Invalid argument passed to ext2 library": errno.EINVAL,
    "Memory allocation failed": errno.ENOMEM,
}


@functools.cache
def code_of(message: str) -> int | None:
    """The error code whose message is ``message`` in this libext2fs, if any."""
    return next((c for c, m in _messages().items() if m == message), None)


def message(code: int) -> str:
    if 0 < code < 4096:
        return os.strerror(code)  # a plain errno (the unix I/O manager passes some on)
    return _messages().get(code, f"libext2fs error {code}")


def failure(code: int, what: str) -> OSError:
    """An ``OSError`` for a failed call: the kernel's errno where there is one."""
    text = message(code)
    err = code if 0 < code < 4096 else _ERRNO_BY_MESSAGE.get(text, errno.EIO)
    return OSError(err, f"{os.strerror(err)} ({text})" if err != code else text, what)


def check(code: int, what: str) -> None:
    if code:
        raise failure(code, what)


def call(fn: Callable[..., int], what: str, *args: object) -> None:
    check(fn(*args), what)
