"""Loop devices and mounts by system call: no mount(8), umount(8) or losetup(8) per layer.

Building a layer's snapshot mounts and unmounts a disk image once; with the
tools that was three fork+exec round trips (~15 ms) per layer.  The same work
is four system calls:

- ``LOOP_CTL_GET_FREE`` on ``/dev/loop-control`` names a free loop device;
- ``LOOP_CONFIGURE`` binds the image to it in one step (backing fd,
  ``LO_FLAGS_AUTOCLEAR``, ``LO_FLAGS_READ_ONLY`` for read-only mounts, no
  direct I/O), the way util-linux's ``mount -o loop`` does;
- ``mount(2)`` of that device, then we close our descriptor: from then on the
  mount is the device's only user, so ``umount2(2)`` releases the device too
  (autoclear), exactly as with ``mount -o loop``.

Between GET_FREE and CONFIGURE another process may take the same device; the
kernel then answers EBUSY and we ask for another one.  A process killed after
CONFIGURE but before mount(2) loses its descriptor with its life, and autoclear
releases the device; one killed after mount(2) leaves a mount that
``Snapshotter.recover`` unmounts.

Numbers and layouts are those of the kernel UAPI headers ``<linux/loop.h>``
and ``<linux/mount.h>`` (checked against the compiled C structs: 304 bytes).
LOOP_CONFIGURE needs Linux 5.8 or later.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

# <linux/loop.h>
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32
LOOP_MAJOR = 7

# <linux/mount.h>
MS_RDONLY = 1
MS_NOATIME = 1024
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# struct loop_config { __u32 fd; __u32 block_size; struct loop_info64 info; __u64 __reserved[8]; }
# struct loop_info64 { __u64 lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit;
#                      __u32 lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags;
#                      __u8 lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32]; __u64 lo_init[2]; }
# Every field sits at its natural alignment, so the packed ("=") layout is the C layout.
_LOOP_CONFIG = struct.Struct(f"=II5Q4I{LO_NAME_SIZE}s{LO_NAME_SIZE}s{LO_KEY_SIZE}s2Q64x")
assert _LOOP_CONFIG.size == 304

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syncfs.restype = ctypes.c_int

#: how often to ask for another free device when others keep taking ours
ATTACH_ATTEMPTS = 64


@dataclass(frozen=True)
class Attached:
    """A loop device we bound, and our open descriptor of it (the caller closes it)."""

    fd: int
    device: Path
    major: int
    minor: int


def loop_config(backing_fd: int, *, readonly: bool, name: str) -> bytes:
    """The ``struct loop_config`` for LOOP_CONFIGURE: whole file, autoclear, buffered I/O."""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if readonly else 0)
    # lo_file_name is informational (losetup shows it); the kernel NUL-terminates it
    file_name = os.fsencode(name)[: LO_NAME_SIZE - 1]
    return _LOOP_CONFIG.pack(
        backing_fd, 0,  # fd, block_size (0: the kernel's default)
        0, 0, 0, 0, 0,  # lo_device, lo_inode, lo_rdevice (read-only), lo_offset, lo_sizelimit
        0, 0, 0, flags,  # lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags
        file_name, b"", b"", 0, 0,
    )  # fmt: skip


def attach(image: Path, *, readonly: bool) -> Attached:
    """Bind ``image`` to a free loop device with autoclear set.

    Raises OSError (FileNotFoundError for a missing image, ...).  The returned
    descriptor keeps the device bound until it is closed or something else
    (a mount) opens it too.
    """
    backing = os.open(image, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    try:
        config = loop_config(backing, readonly=readonly, name=str(image))
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            last: OSError | None = None
            for _ in range(ATTACH_ATTEMPTS):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = Path(f"/dev/loop{number}")
                try:
                    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    # ENOENT: a new device whose node devtmpfs has not made yet;
                    # ENXIO/ENODEV: another process removed the device meanwhile
                    if e.errno not in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                        raise
                    last = e
                    time.sleep(0.001)
                    continue
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                except OSError as e:
                    os.close(fd)
                    # EBUSY: another process bound it since GET_FREE; ENXIO/ENODEV: removed meanwhile
                    if e.errno in (errno.EBUSY, errno.ENXIO, errno.ENODEV):
                        last = e
                        continue
                    raise
                rdev = os.fstat(fd).st_rdev
                return Attached(fd, device, os.major(rdev), os.minor(rdev))
            assert last is not None
            raise last
        finally:
            os.close(ctl)
    finally:
        os.close(backing)  # the loop device holds its own reference to the file


def detach(device: Path) -> None:
    """LOOP_CLR_FD: unbind a loop device (if something still has it open, it goes on last close)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: it was not bound (any more)
            raise
    finally:
        os.close(fd)


def mount(source: Path, target: Path, fstype: str, flags: int, data: str | None = None) -> None:
    """mount(2); raises OSError with the errno."""
    rc = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode(),
        flags,
        data.encode() if data is not None else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def syncfs(path: Path) -> None:
    """syncfs(2) of the file system mounted at ``path``: write back what is cached, and
    (Linux >= 5.8) raise OSError if any write back failed since the mount, e.g. when
    the loop device's backing file could not grow (EIO): umount would not tell."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def umount(target: Path, flags: int = 0) -> None:
    """umount2(2) with UMOUNT_NOFOLLOW (a symlink never redirects it); raises OSError."""
    rc = _libc.umount2(os.fsencode(target), flags | UMOUNT_NOFOLLOW)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))
