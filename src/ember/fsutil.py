"""Small filesystem helpers shared by every area: atomic writes, fsync, reflinks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    _fsync(path, os.O_RDONLY | os.O_CLOEXEC)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: how ``atomic_write`` (and writers like it) name their temp file: ``.NAME.<random>.tmp``
#: beside NAME (hidden, and no reader's pattern takes it for the file itself)
TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix.

    temp file in the same directory, fsync, rename, fsync the directory.  A writer
    killed (SIGKILL) before its rename leaves the temp file: ``stale_temps`` sweeps those.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def link_open_file(fd: int, path: Path) -> None:
    """Give the open, unnamed file ``fd`` (``O_TMPFILE``) the name ``path`` (which must not
    exist): ``linkat`` of its ``/proc/self/fd`` link, followed (``AT_SYMLINK_FOLLOW``),
    which needs no capability (``AT_EMPTY_PATH`` would).  ``os.link`` calls ``link``,
    which links the /proc entry itself: EXDEV."""
    import ctypes  # only for this

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(path),
                   at_symlink_follow) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is named like ``atomic_write``'s temp files (``.*.tmp``)."""
    return len(name) > len(TEMP_SUFFIX) + 1 and name[0] == "." and name.endswith(TEMP_SUFFIX)


def stale_temps(
    directory: Path,
    older_than: float,
    *,
    remove: bool = False,
    follow: bool = False,
    now: float | None = None,
) -> tuple[int, int]:
    """The temp files writers killed half-way left in ``directory`` (``atomic_write``'s
    ``.NAME.*.tmp``): regular files so named, not modified for ``older_than`` seconds (a
    live writer's is seconds old).  How many, and their bytes; ``remove``: delete them
    (without it nothing changes: a dry run's count).

    Never follows a symlink: neither ``directory`` itself unless ``follow`` (a directory
    ember makes inside its state directory is never one; the state directory may be, by
    its owner's choice) nor any entry (a symlink, a directory or a FIFO so named is left
    alone).  A missing directory holds none.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(directory, flags)
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink
            return 0, 0
        raise
    count = size = 0
    now = time.time() if now is None else now
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if not is_temp_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < older_than:
                        continue
                    if remove:
                        os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:  # gone meanwhile (its writer's rename, another sweep)
                    continue
                count += 1
                size += st.st_size
    finally:
        os.close(fd)
    return count, size


#: FICLONE, _IOW(0x94, 9, int): <linux/fs.h>
_FICLONE = 0x40049409


def old_directory(path: Path, older_than: float, now: float | None = None) -> bool:
    """Whether ``path`` is a directory (not a symlink) unchanged for ``older_than``
    seconds: neither its entries (mtime) nor its name (ctime: a rename makes it, and a
    deletion under way keeps it, recent)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    now = time.time() if now is None else now
    return stat.S_ISDIR(st.st_mode) and now - max(st.st_mtime, st.st_ctime) >= older_than


def tree_bytes(path: Path) -> int:
    """The bytes of the regular files under the directory ``path`` (no symlink followed)."""
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def stale_work_dirs(
    directory: Path,
    prefix: str,
    older_than: float,
    unused: Callable[[str], bool],
    *,
    remove: bool = False,
) -> tuple[int, int]:
    """The work directories killed commands left in ``directory``: named ``prefix...``,
    unchanged for ``older_than`` seconds (``old_directory``: never a symlink) and for
    which ``unused(name)`` says nothing works in them now (their lock is free, say).
    How many, and their bytes; ``remove``: delete them (never through a symlink)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0
    count = size = 0
    for name in names:
        path = directory / name
        if not old_directory(path, older_than) or not unused(name):
            continue
        found = tree_bytes(path)
        if remove:
            try:
                remove_tree(path)
            except OSError:  # gone meanwhile (another sweep), or a symlink put there
                continue
        count += 1
        size += found
    return count, size


def reflink(src_fd: int, dst_fd: int) -> None:
    """Make the file ``dst_fd`` share every block of ``src_fd`` (FICLONE): constant time
    and space.  OSError where the file system has no reflinks (ext4) or the two files are
    on different file systems."""
    fcntl.ioctl(dst_fd, _FICLONE, src_fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write less: a pipe, a full disk);
    OSError when it cannot, ENOSPC when a write wrote nothing."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:  # never for a file with room or a pipe: no endless loop if it were
            raise OSError(errno.ENOSPC, "wrote nothing")
        view = view[written:]


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a regular file was expected."""


def why_unopened(e: OSError) -> str:
    """How ``open_regular`` failed, worded to follow the path in a message."""
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, NotRegularFile):
        return "is not a regular file"
    return f"cannot be read ({e.strerror or e})"


def open_regular(path: Path, *, vet: Callable[[int], None] | None = None) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; NotRegularFile (or the
    open's own OSError) otherwise.

    The file is first reached with O_PATH, which opens nothing: a device's driver is
    not called (opening /dev/watchdog arms it, a tape rewinds, a tty may become the
    controlling terminal), a FIFO does not wait for a writer.  Its type is checked on
    that descriptor, and ``vet``, when given, is called with it (to refuse a file by
    where it is, say) before the file itself is opened through it: the file checked
    is the file read.
    """
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            raise NotRegularFile(0, "not a regular file", os.fspath(path))
        if vet is not None:
            vet(pfd)
        # the magic link opens the very inode the O_PATH descriptor holds
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    return os.fdopen(fd, "rb")


def remove_tree(path: str | os.PathLike[str], *, expect: os.stat_result | None = None) -> None:
    """Remove the directory ``path`` and everything below it, never following a symlink.

    Iterative, with one directory open at a time: shutil.rmtree recurses (and keeps a
    descriptor open) per level, and an image's layers can build a tree deeper than Python's
    recursion limit or the process's descriptor limit (PATH_MAX allows 2047 levels
    of "/a", and a symlink into the deepest one lets the next entry go on from there).
    Each directory is listed once (its subdirectories kept in ``levels``), so a wide
    one costs no more than with shutil.  It goes back up through "..", and stops
    (MovedDuringRemoval) where ".." is not the directory it came down from: someone
    moved a directory of the tree elsewhere meanwhile, and going on would remove
    what is beside it there.  ``expect``: as for ``empty_directory``.
    """
    empty_directory(path, expect=expect)
    os.rmdir(path)


class MovedDuringRemoval(OSError):
    """A directory of a tree being removed was moved out of it meanwhile."""


def empty_directory(
    path: str | os.PathLike[str], *, expect: os.stat_result | None = None
) -> None:
    """Remove everything below the directory ``path`` (not a symlink to one), keeping it:
    ``remove_tree`` but the last step.  ``expect``: ``path``'s ``lstat`` from before;
    a directory put in its place since is left alone (MovedDuringRemoval)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags)
    names: list[str] = []  # from ``path`` down to the directory open in ``fd``
    try:
        if expect is not None and not _same_file(os.fstat(fd), expect):
            raise MovedDuringRemoval(errno.ESTALE, "replaced since it was checked", os.fspath(path))
        # (st_dev, st_ino) of each directory from ``path`` down to the one open in ``fd``
        seen = [_identity(os.fstat(fd))]
        levels = [_empty_but_subdirectories(fd)]  # per open level: subdirectories left
        while True:
            if levels[-1]:
                name = levels[-1].pop()
                child = os.open(name, flags, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(name)
                seen.append(_identity(os.fstat(fd)))
                levels.append(_empty_but_subdirectories(fd))
                continue
            levels.pop()
            if not names:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            seen.pop()
            if _identity(os.fstat(fd)) != seen[-1]:
                raise MovedDuringRemoval(
                    errno.ESTALE, "a directory below it was moved elsewhere meanwhile",
                    os.path.join(os.fspath(path), *names),
                )
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return _identity(a) == _identity(b)


def _empty_but_subdirectories(fd: int) -> list[str]:
    """Unlink everything in the directory ``fd`` but its subdirectories; their names."""
    subdirectories = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return subdirectories
