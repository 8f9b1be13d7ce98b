"""The host side: external tools, mounts and loop devices.

Everything that runs a program or reads /proc and /sys lives here, so the rest
of the snapshotter is logic over paths.  Disk images are mounted by system
call (loop.py: LOOP_CONFIGURE with autoclear, mount(2), umount2(2)), so an
unmount always releases the loop device too, as with ``mount -o loop``;
``recover`` in the snapshotter handles what a killed process left behind.
The ext4 tools (mkfs.ext4, e2fsck, resize2fs) stay programs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.snapshots import loop
from ember.snapshots.errors import CommandFailed, MountFailed
from ember.snapshots.loop import LOOP_MAJOR


def _tool_path() -> str:
    """The caller's PATH, then where the tools live (/usr/sbin, which a non-login PATH
    may lack).  Read at each call: a command run by ``ember agent`` gets its caller's
    environment after this module was imported."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def run(argv: Sequence[str | os.PathLike[str]], what: str) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise one line saying what failed and the tool's last words."""
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": _tool_path(), "LC_ALL": "C"},
            check=False,
        )
    except FileNotFoundError:
        raise CommandFailed(f"{what}: {args[0]} is not installed") from None
    if proc.returncode != 0:
        said = last_words(args[0], proc.stderr or proc.stdout)
        raise CommandFailed(f"{what}: {said or f'exit status {proc.returncode}'}")
    return proc


def last_words(tool: str, output: str) -> str | None:
    """What a failed tool said last in its own name (``resize2fs: New size results in
    too many block group descriptors.``), else its last line: after its reason it may
    go on with advice (resize2fs's "Please run 'e2fsck -fy ...' to fix the file system
    / after the aborted resize operation.", which alone read as a damaged disk)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith(f"{os.path.basename(tool)}: ")]
    if own:
        return own[-1]
    return lines[-1] if lines else None


# -- /proc/self/mountinfo ------------------------------------------------------------------

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: Path
    fstype: str
    source: str
    major: int
    minor: int


def mounts() -> list[MountEntry]:
    out: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
                major, minor = (int(x) for x in fields[2].split(":"))
                out.append(
                    MountEntry(
                        mountpoint=Path(_unescape(fields[4])),
                        fstype=fields[sep + 1],
                        source=_unescape(fields[sep + 2]),
                        major=major,
                        minor=minor,
                    )
                )
            except (ValueError, IndexError):
                continue
    return out


def mounts_under(prefix: Path) -> list[MountEntry]:
    """Mounts at or below ``prefix``, deepest first (the order to unmount them)."""
    found = [m for m in mounts() if m.mountpoint == prefix or prefix in m.mountpoint.parents]
    return sorted(found, key=lambda m: len(m.mountpoint.parts), reverse=True)


def is_mountpoint(path: Path) -> bool:
    return any(m.mountpoint == path for m in mounts())


# -- loop devices --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopDevice:
    device: Path
    backing_file: str
    major: int
    minor: int


def loop_devices() -> list[LoopDevice]:
    """Attached loop devices and their backing files, from sysfs (no losetup round trip)."""
    out: list[LoopDevice] = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        base = Path("/sys/block") / name
        try:
            backing = (base / "loop" / "backing_file").read_text().rstrip("\n")
            major, minor = (int(x) for x in (base / "dev").read_text().strip().split(":"))
        except (FileNotFoundError, OSError, ValueError):
            continue  # not attached
        out.append(LoopDevice(Path("/dev") / name, backing, major, minor))
    return out


def loops_backed_under(prefix: Path) -> list[LoopDevice]:
    text = str(prefix).rstrip("/") + "/"
    return [lo for lo in loop_devices() if lo.backing_file.startswith(text)]


def loop_autoclear(lo: LoopDevice) -> bool:
    """Whether ``lo`` is set to release itself on its last close (LO_FLAGS_AUTOCLEAR, as
    every device ember binds is).  False when that cannot be read (released meanwhile)."""
    try:
        return Path(f"/sys/dev/block/{lo.major}:{lo.minor}/loop/autoclear").read_text().strip() == "1"
    except OSError:
        return False


def detach_loop(device: Path) -> None:
    try:
        loop.detach(device)
    except OSError as e:
        raise CommandFailed(f"cannot detach {device}: {e.strerror}") from e


# -- mounting disk images ------------------------------------------------------------------


def _mount_existing(image: Path, target: Path, fstype: str) -> LoopDevice | None:
    """Mount the read-write loop device some other process already attached to ``image``.

    The pool's file system must not be mounted through two loop devices at once (XFS
    refuses the second: same UUID), yet a process in another mount namespace (a
    monitor, a builder started under ``ip netns exec``) can keep it mounted there:
    reuse its device, as util-linux's ``mount -o loop`` does."""
    backing = os.path.realpath(image)
    for lo in loop_devices():
        if lo.backing_file != backing:
            continue
        try:
            if (Path(f"/sys/dev/block/{lo.major}:{lo.minor}/ro")).read_text().strip() != "0":
                continue
            loop.mount(lo.device, target, fstype, loop.MS_NOATIME, None)
        except OSError:
            continue  # released meanwhile, or not mountable: attach our own
        return lo
    return None


def mount_image(
    image: Path,
    target: Path,
    *,
    readonly: bool,
    fstype: str = "ext4",
    barrier: bool = True,
    share: bool = False,
) -> LoopDevice:
    """Loop-mount ``image`` on ``target``; returns the loop device, released again by ``unmount``.

    A read-only mount gets a read-only loop device and, for ext4, ``noload``, so
    that nothing, not even journal replay, writes (what ``mount -o loop,ro`` did).
    ``share``: mount the device another process attached to the same file, if any
    (the pool: one file system, mounted in several mount namespaces).
    ``barrier=False`` (ext4, read-write): no cache flushes, which a loop device
    turns into an fsync of the image per journal commit; only for a disk that
    is thrown away after a crash and fsync'ed as a whole before it counts.
    """
    what = f"cannot mount {image.name} at {target}"
    backing = os.path.realpath(image)  # how sysfs names the device's backing file
    if share and not readonly:
        existing = _mount_existing(image, target, fstype)
        if existing is not None:
            return existing
    try:
        dev = loop.attach(image, readonly=readonly)
    except OSError as e:
        if e.filename is not None and os.fspath(e.filename) == os.fspath(image):
            if isinstance(e, FileNotFoundError):
                raise MountFailed(f"{what}: {image} does not exist") from None
            raise MountFailed(f"{what}: cannot open {image}: {e.strerror}") from e
        where = f" ({os.fspath(e.filename)})" if e.filename is not None else ""
        raise MountFailed(f"{what}: cannot set up a loop device: {e.strerror}{where}") from e
    mounted = False
    try:
        flags = loop.MS_NOATIME | (loop.MS_RDONLY if readonly else 0)
        data = None
        if fstype == "ext4":
            data = "noload" if readonly else (None if barrier else "nobarrier")
        loop.mount(dev.device, target, fstype, flags, data)
        mounted = True
    except OSError as e:
        reason = e.strerror
        if e.errno == errno.EINVAL and fstype == "ext4" and not _has_ext4_magic(image):
            reason = "it does not hold an ext4 file system"
        raise MountFailed(f"{what}: {reason}") from e
    finally:
        # from here on the mount is the device's only user (autoclear: unmount releases it);
        # after a failed mount this close is the last one and releases it now
        os.close(dev.fd)
        if not mounted:
            wait_loop_released(dev.major, dev.minor, backing)
    return LoopDevice(dev.device, backing, dev.major, dev.minor)


def _has_ext4_magic(image: Path) -> bool:
    try:
        with open(image, "rb") as f:
            f.seek(1024 + 0x38)
            return f.read(2) == b"\x53\xef"
    except OSError:
        return False


def unmount(
    target: Path,
    *,
    device: LoopDevice | None = None,
    attempts: int = 20,
    remove_mountpoint: bool = False,
    lazy_grace: float | None = None,
) -> None:
    """Unmount, retrying while busy; as a last resort detach lazily so nothing stays visible.

    Returns once the loop device under the mount (if any) is released too: the
    kernel may clear an autoclear loop device after umount2 returns (when
    another opener, such as udev's probe, closes it last).  ``device``: the
    loop device ``mount_image`` returned, which spares reading mountinfo.

    ``remove_mountpoint``: remove the (empty) directory once unmounted, before that
    wait.  A copy of the mount in a mount namespace made while it was mounted (a
    confined VMM's, started meanwhile) keeps the file system, and so the loop device,
    until its mount point goes: the kernel detaches such copies then (removed after
    the wait, it held every such unmount for the wait's full 5 s).

    ``lazy_grace``: how long a lazily detached mount may take to let go of its loop
    device before this says it is still in use (default ``LAZY_GRACE``).
    """
    if device is not None:
        major, minor = device.major, device.minor
    else:
        entry = next((m for m in mounts() if m.mountpoint == target), None)
        major, minor = (entry.major, entry.minor) if entry is not None else (0, 0)
    last: OSError | None = None
    for i in range(attempts):
        try:
            loop.umount(target)
            last = None
            break
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT) and not is_mountpoint(target):
                last = None
                break  # not (or no longer) mounted
            if e.errno != errno.EBUSY:
                raise CommandFailed(f"cannot unmount {target}: {e.strerror}") from e
            last = e
            time.sleep(min(0.05 * (i + 1), 0.5))
    else:
        try:
            loop.umount(target, loop.MNT_DETACH)
        except OSError as e:
            raise CommandFailed(f"cannot unmount {target}: {e.strerror}") from e
        if remove_mountpoint:
            _remove_mountpoint(target)
        if last is not None and is_mountpoint(target):
            raise CommandFailed(f"cannot unmount {target}: {last.strerror}")
        # Detached lazily: gone from view, but the file system lives on (and may be
        # written) until its last user lets go.  Not an unmount a caller may build on
        # (a commit would seal a disk that still changes): say so unless it ends soon.
        backing = device.backing_file if device is not None else None
        grace = LAZY_GRACE if lazy_grace is None else lazy_grace
        if major == LOOP_MAJOR and not _loop_released(major, minor, backing, grace):
            raise CommandFailed(
                f"cannot unmount {target}: it is still in use; detached lazily, its loop "
                "device is released when the last process using it lets go"
            )
        return
    if remove_mountpoint:
        _remove_mountpoint(target)
    if major == LOOP_MAJOR:
        wait_loop_released(major, minor, device.backing_file if device is not None else None)


def _remove_mountpoint(target: Path) -> None:
    # (best effort: one that stays, say another mount made on it meanwhile, leaves the
    # wait for the loop device as it was)
    with contextlib.suppress(OSError):
        target.rmdir()


#: how long a lazily detached mount may take to let go of its loop device
LAZY_GRACE = 2.0


def _loop_released(major: int, minor: int, backing: str | None, timeout: float) -> bool:
    """Whether the loop device drops ``backing`` (or any file, when None) within ``timeout``."""
    path = Path(f"/sys/dev/block/{major}:{minor}/loop/backing_file")
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = path.read_text().rstrip("\n")
        except OSError:
            return True  # not bound
        if backing is not None and current.removesuffix(" (deleted)") != backing:
            return True  # bound again, by someone else: ours was released
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def wait_loop_released(
    major: int, minor: int, backing: str | None = None, timeout: float = 5.0
) -> bool:
    """Wait for an autoclear loop device to drop its backing file; detach it if it does
    not.  Whether it is released by the end (False: still in use, set to go on its last
    close).

    ``backing``: the file we bound.  Once the device is released another
    process may bind the same (free again) device at once; when the backing
    file is no longer ours, ours was released and the device is not ours to
    detach.
    """
    if _loop_released(major, minor, backing, timeout):
        return True
    try:
        name = Path(f"/sys/dev/block/{major}:{minor}").resolve().name
        detach_loop(Path("/dev") / name)
    except (CommandFailed, OSError):
        pass
    return _loop_released(major, minor, backing, 0.0)


# -- ext4 tools ----------------------------------------------------------------------------


#: how ember formats an empty disk (also part of the name of the cached empty bases)
MKFS_OPTIONS = ("-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,discard")
MKFS_LABEL = "ember-root"


def mkfs_ext4(image: Path, size: int, label: str = MKFS_LABEL) -> None:
    """An empty ext4 in a sparse file, created in constant time and space.

    lazy_itable_init/lazy_journal_init skip zeroing; on a file mke2fs discards
    (punches) the whole range first, so the tables are known to read as zero and
    the kernel's lazy-init thread has nothing to write later: clones stay shared.
    The journal is kept: it costs nothing in a sparse file and makes machine root
    disks survive a guest crash.  No reserved blocks: the disk is the container's.
    """
    with open(image, "xb") as f:
        f.truncate(size)
    run(
        ["mkfs.ext4", "-F", "-q", *MKFS_OPTIONS, "-L", label, image],
        f"cannot create an ext4 file system in {image}",
    )



def fsck_readonly(image: Path) -> None:
    """``e2fsck -fn``: a full check that changes nothing; non-zero means damage."""
    run(["e2fsck", "-f", "-n", image], f"file system check of {image.name} failed")


def _superblock(image: Path) -> bytes:
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or sb[56:58] != b"\x53\xef":
        raise CommandFailed(f"{image} does not hold an ext4 file system")
    return sb


def _block_size(sb: bytes) -> int:
    return 1024 << int.from_bytes(sb[24:28], "little")


def fs_size(image: Path) -> int:
    """Size of the ext4 file system in ``image`` (block count x block size), from its superblock."""
    sb = _superblock(image)
    blocks_lo = int.from_bytes(sb[4:8], "little")
    blocks_hi = int.from_bytes(sb[0x150:0x154], "little")
    return (blocks_lo | (blocks_hi << 32)) * _block_size(sb)


def min_ext4_size(image: Path) -> int:
    """The least size (bytes) ``image``'s file system can be shrunk to (``resize2fs -P``:
    its data, and the metadata its current size laid out)."""
    out = run(["resize2fs", "-P", image], f"cannot size {image.name}").stdout
    for line in out.splitlines():
        if line.startswith("Estimated minimum size of the filesystem:"):
            return int(line.rpartition(":")[2]) * _block_size(_superblock(image))
    raise CommandFailed(f"cannot size {image.name}: resize2fs -P gave no estimate")


def resize_ext4(image: Path, size: int) -> None:
    """Grow (or shrink) the file and its file system to ``size`` bytes.

    Growing is a metadata-only operation whose cost depends on the new size, not
    on the data in the image.  ``-f`` because the image was checked with -n,
    which does not record a check time.
    """
    current = os.stat(image).st_size
    if size > current:
        os.truncate(image, size)
    run(["resize2fs", "-f", image, f"{size // 1024}K"], f"cannot resize {image.name}")
    if size < current:
        os.truncate(image, size)
