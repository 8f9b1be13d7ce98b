"""The host side: external tools, mounts and loop devices.

Everything that runs a program or reads /proc and /sys lives here, so the rest
of the snapshotter is logic over paths.  Mounts use ``mount -o loop`` with the
loop device's autoclear flag (util-linux sets it), so an unmount always
releases the loop device too; ``recover`` in the snapshotter handles what a
killed process left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.snapshots.errors import CommandFailed

# Tools live in /usr/sbin, which a non-login PATH may lack.
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def run(argv: Sequence[str | os.PathLike[str]], what: str) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise one line saying what failed and the tool's last words."""
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": _PATH, "LC_ALL": "C"},
            check=False,
        )
    except FileNotFoundError:
        raise CommandFailed(f"{what}: {args[0]} is not installed") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise CommandFailed(f"{what}: {detail}")
    return proc


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


def detach_loop(device: Path) -> None:
    run(["losetup", "-d", device], f"cannot detach {device}")


# -- mounting disk images ------------------------------------------------------------------


def mount_image(image: Path, target: Path, *, readonly: bool, fstype: str = "ext4") -> None:
    opts = ["loop", "noatime"]
    # A read-only mount also gets a read-only loop device (util-linux does that
    # for ``ro``), and ``noload`` so that nothing, not even journal replay, writes.
    opts += ["ro", "noload"] if readonly and fstype == "ext4" else (["ro"] if readonly else ["rw"])
    run(
        ["mount", "-t", fstype, "-o", ",".join(opts), image, target],
        f"cannot mount {image.name} at {target}",
    )


def unmount(target: Path, *, attempts: int = 20) -> None:
    """Unmount, retrying while busy; as a last resort detach lazily so nothing stays visible.

    Returns once the loop device under the mount (if any) is released too: the
    kernel clears an autoclear loop device asynchronously after the last close.
    """
    entry = next((m for m in mounts() if m.mountpoint == target), None)
    last: CommandFailed | None = None
    for i in range(attempts):
        try:
            run(["umount", target], f"cannot unmount {target}")
            last = None
            break
        except CommandFailed as e:
            if not is_mountpoint(target):
                last = None
                break
            last = e
            time.sleep(min(0.05 * (i + 1), 0.5))
    else:
        run(["umount", "-l", target], f"cannot unmount {target}")
        if last is not None and is_mountpoint(target):
            raise last
        return  # a lazy unmount releases the device when its last user goes
    if entry is not None and entry.major == LOOP_MAJOR:
        wait_loop_released(entry.major, entry.minor)


LOOP_MAJOR = 7


def wait_loop_released(major: int, minor: int, timeout: float = 5.0) -> None:
    """Wait for an autoclear loop device to drop its backing file; detach it if it does not."""
    backing = Path(f"/sys/dev/block/{major}:{minor}/loop/backing_file")
    deadline = time.monotonic() + timeout
    while backing.exists():
        if time.monotonic() > deadline:
            try:
                name = Path(f"/sys/dev/block/{major}:{minor}").resolve().name
                detach_loop(Path("/dev") / name)
            except (CommandFailed, OSError):
                pass
            return
        time.sleep(0.005)


# -- ext4 tools ----------------------------------------------------------------------------


def mkfs_ext4(image: Path, size: int, label: str = "ember-root") -> None:
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
        [
            "mkfs.ext4", "-F", "-q", "-m", "0", "-L", label,
            "-E", "lazy_itable_init=1,lazy_journal_init=1,discard",
            image,
        ],
        f"cannot create an ext4 file system in {image}",
    )  # fmt: skip


def fsck_readonly(image: Path) -> None:
    """``e2fsck -fn``: a full check that changes nothing; non-zero means damage."""
    run(["e2fsck", "-f", "-n", image], f"file system check of {image.name} failed")


def fs_size(image: Path) -> int:
    """Size of the ext4 file system in ``image`` (block count x block size), from its superblock."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or sb[56:58] != b"\x53\xef":
        raise CommandFailed(f"{image} does not hold an ext4 file system")
    blocks_lo = int.from_bytes(sb[4:8], "little")
    blocks_hi = int.from_bytes(sb[0x150:0x154], "little")
    log_block = int.from_bytes(sb[24:28], "little")
    return (blocks_lo | (blocks_hi << 32)) * (1024 << log_block)


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
