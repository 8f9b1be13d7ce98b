"""Loop devices and mounts by system call (loop.py, system.mount_image/unmount), on real devices."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.snapshots import loop, system
from ember.snapshots.errors import CommandFailed, MountFailed
from tests.snapshots.leaks import ours

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for m in system.mounts_under(tmp_path):
        subprocess.run(["umount", "-l", str(m.mountpoint)], check=False)
    for lo in system.loops_backed_under(tmp_path):
        subprocess.run(["losetup", "-d", str(lo.device)], check=False)
    mounts, loops = ours(tmp_path)
    assert mounts == [] and loops == [], f"left behind: {mounts} {loops}"


def _ext4(path: Path, size: int = 64 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(path)], check=True, capture_output=True)
    return path


def _entry(target: Path) -> system.MountEntry:
    found = [m for m in system.mounts() if m.mountpoint == target]
    assert len(found) == 1, found
    return found[0]


def _options(target: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(target):
                return fields[5].split(",")
    raise AssertionError(f"{target} is not mounted")


def _released(major: int, minor: int, image: Path) -> bool:
    """Does the device drop ``image`` by itself (within a generous bound for a loaded host)?

    Polled here rather than with wait_loop_released, which detaches the device
    after its timeout and so would hide a device that autoclear never released.
    """
    backing = Path(f"/sys/dev/block/{major}:{minor}/loop/backing_file")

    def bound() -> bool:
        try:
            return backing.read_text().strip() == str(image)
        except OSError:
            return False

    deadline = time.monotonic() + 15
    while bound() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not bound()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_write_mount_round_trip(work: Path) -> None:
    image, target = _ext4(work / "disk.ext4"), work / "mnt"
    target.mkdir()
    dev = system.mount_image(image, target, readonly=False)
    try:
        entry = _entry(target)
        assert (entry.major, entry.minor) == (dev.major, dev.minor) == (7, dev.minor)
        assert entry.fstype == "ext4" and entry.source == str(dev.device)
        assert "rw" in _options(target) and "noatime" in _options(target)
        sysfs = Path(f"/sys/dev/block/{dev.major}:{dev.minor}")
        assert (sysfs / "loop/backing_file").read_text().strip() == str(image)
        assert (sysfs / "loop/autoclear").read_text().strip() == "1"
        assert (sysfs / "ro").read_text().strip() == "0"
        assert (sysfs / "loop/dio").read_text().strip() == "0"
        (target / "hello").write_text("world\n")
    finally:
        system.unmount(target, device=dev)
    assert not system.is_mountpoint(target)
    assert ours(work) == ([], [])  # autoclear: the unmount released the device too
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)


def test_read_only_mount_writes_nothing(work: Path) -> None:
    image, target = _ext4(work / "disk.ext4"), work / "mnt"
    target.mkdir()
    dev = system.mount_image(image, target, readonly=False)
    (target / "kept").write_text("data\n")
    system.unmount(target, device=dev)
    before = _sha(image)
    dev = system.mount_image(image, target, readonly=True)
    try:
        assert {"ro", "noatime"} <= set(_options(target))
        ro = Path(f"/sys/dev/block/{dev.major}:{dev.minor}/ro").read_text().strip()
        assert ro == "1"  # the loop device itself is read-only
        assert (target / "kept").read_text() == "data\n"
        with pytest.raises(OSError):
            (target / "new").write_text("x")
    finally:
        system.unmount(target, device=dev)
    assert _sha(image) == before
    assert ours(work) == ([], [])


def test_unmount_without_the_device_finds_it(work: Path) -> None:
    """recover() unmounts what another process mounted: the loop device is found in mountinfo."""
    image, target = _ext4(work / "disk.ext4"), work / "mnt"
    target.mkdir()
    system.mount_image(image, target, readonly=False)
    system.unmount(target)
    assert ours(work) == ([], [])
    system.unmount(target)  # not mounted any more: nothing to do


def test_missing_image_is_a_clear_error(work: Path) -> None:
    target = work / "mnt"
    target.mkdir()
    with pytest.raises(MountFailed, match="does not exist"):
        system.mount_image(work / "absent.ext4", target, readonly=True)
    (work / "a-directory").mkdir()
    with pytest.raises(MountFailed, match="cannot open .*a-directory: Is a directory"):
        system.mount_image(work / "a-directory", target, readonly=False)
    assert not system.is_mountpoint(target)


def test_non_ext4_file_is_refused_and_its_loop_released(work: Path) -> None:
    junk, target = work / "junk.img", work / "mnt"
    junk.write_bytes(os.urandom(1 << 20))
    target.mkdir()
    for readonly in (True, False):
        with pytest.raises(MountFailed, match="does not hold an ext4 file system"):
            system.mount_image(junk, target, readonly=readonly)
        # released before mount_image returned, not eventually
        assert ours(work) == ([], [])
    assert not system.is_mountpoint(target)


def test_failed_mount_of_a_good_image_releases_the_loop(work: Path) -> None:
    image = _ext4(work / "disk.ext4")
    with pytest.raises(MountFailed, match="cannot mount disk.ext4"):
        system.mount_image(image, work / "no-such-dir", readonly=False)
    assert ours(work) == ([], [])
    xfs_as_ext4 = work / "xfs.img"
    with open(xfs_as_ext4, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(xfs_as_ext4)], check=True)
    (work / "mnt").mkdir()
    with pytest.raises(MountFailed, match="does not hold an ext4"):
        system.mount_image(xfs_as_ext4, work / "mnt", readonly=True)
    assert ours(work) == ([], [])


def test_concurrent_attaches_get_distinct_devices(work: Path) -> None:
    """Threads racing for the free device: each gets its own (EBUSY answers are retried)."""
    images = [_ext4(work / f"d{i}.ext4", 8 << 20) for i in range(6)]
    results: list[loop.Attached] = []
    order: list[Path] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(len(images))

    def attach(image: Path) -> None:
        start.wait()
        try:
            att = loop.attach(image, readonly=True)
            with lock:
                results.append(att)
                order.append(image)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=attach, args=(img,)) for img in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len({r.device for r in results}) == len(images)
        backing = {
            Path(f"/sys/dev/block/{r.major}:{r.minor}/loop/backing_file").read_text().strip()
            for r in results
        }
        assert backing == {str(img) for img in images}
    finally:
        for r in results:
            os.close(r.fd)
    # closing the only descriptor releases an autoclear device
    assert all(_released(r.major, r.minor, img) for r, img in zip(results, order, strict=True))
    assert ours(work) == ([], [])


_RACER = """
import os, sys
from pathlib import Path
from ember.snapshots import loop, system
image = Path(sys.argv[1])
for _ in range(int(sys.argv[2])):
    att = loop.attach(image, readonly=True)
    try:
        sysfs = Path(f"/sys/dev/block/{att.major}:{att.minor}/loop/backing_file")
        bound = sysfs.read_text().strip()
        if bound != str(image):
            sys.exit(f"{att.device} is bound to {bound}, not to {image}")
    finally:
        os.close(att.fd)
    system.wait_loop_released(att.major, att.minor, str(image))
"""


def test_processes_racing_for_free_devices_never_share_one(work: Path) -> None:
    """Several processes attach and release in a loop: each device is bound to its caller's image."""
    images = [_ext4(work / f"r{i}.ext4", 8 << 20) for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(img), "25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for img in images
    ]
    outcomes = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert all(rc == 0 for rc, _ in outcomes), outcomes
    assert ours(work) == ([], [])


_KILLED_AFTER_ATTACH = """
import os, signal, sys
from pathlib import Path
from ember.snapshots import loop
att = loop.attach(Path(sys.argv[1]), readonly=False)
print(f"{att.major}:{att.minor}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_between_attach_and_mount_leaves_no_device(work: Path) -> None:
    image = _ext4(work / "disk.ext4", 8 << 20)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_ATTACH, str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr
    major, minor = (int(x) for x in proc.stdout.strip().split(":"))
    # the kernel closed the dead process's descriptor: autoclear released the device
    assert _released(major, minor, image)
    assert ours(work) == ([], [])


def test_detach_of_a_device_still_open(work: Path) -> None:
    image = _ext4(work / "disk.ext4", 8 << 20)
    att = loop.attach(image, readonly=True)
    try:
        system.detach_loop(att.device)
    finally:
        os.close(att.fd)
    assert _released(att.major, att.minor, image)
    assert ours(work) == ([], [])
    system.detach_loop(att.device)  # detaching an unbound device is not an error


def test_busy_mount_is_detached_lazily_and_said_to_be_busy(work: Path) -> None:
    """Detached lazily after its retries, unmount returned as if done: a commit would then
    seal a disk whose file system still lives (and may be written)."""
    image, target = _ext4(work / "disk.ext4"), work / "mnt"
    target.mkdir()
    dev = system.mount_image(image, target, readonly=False)
    held = open(target / "open-file", "w")  # noqa: SIM115 - kept open across the unmount
    try:
        with pytest.raises(CommandFailed, match="still in use; detached lazily"):
            system.unmount(target, device=dev, attempts=2)
        assert not system.is_mountpoint(target)  # gone from the namespace at once
    finally:
        held.close()
    assert _released(dev.major, dev.minor, image)  # released when its last user went
    assert ours(work) == ([], [])


def test_loop_config_layout() -> None:
    """The struct matches <linux/loop.h>: fd, block_size, then loop_info64 at offset 8."""
    raw = loop.loop_config(5, readonly=True, name="/x/disk.ext4")
    assert len(raw) == 304
    assert int.from_bytes(raw[0:4], "little") == 5
    assert int.from_bytes(raw[8 + 52 : 8 + 56], "little") == (
        loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_AUTOCLEAR
    )
    assert raw[8 + 56 : 8 + 56 + 13] == b"/x/disk.ext4\0"
    assert raw[240:] == bytes(64)  # __reserved


def test_a_mount_copied_into_another_namespace_is_released_with_its_mount_point(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confined VMM started while a layer was being applied has a copy of the builder's
    mount in its own mount namespace: after the host's unmount, that copy held the file
    system and its loop device, and the unmount waited its full 5 s for the device, per
    layer, then detached it in vain (the mount point, removed after, freed it).  Its
    mount point removed first, the kernel detaches such copies at once."""
    forced: list[Path] = []
    detach = system.detach_loop

    def detach_seen(device: Path) -> None:
        forced.append(device)  # (only when the device was not released in time)
        detach(device)

    monkeypatch.setattr(system, "detach_loop", detach_seen)
    image, target = _ext4(work / "disk.ext4"), work / "mnt"
    target.mkdir()
    dev = system.mount_image(image, target, readonly=False)
    # a process in a mount namespace of its own, made now: it holds a copy of the mount
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    try:
        ns = f"/proc/{holder.pid}/ns/mnt"
        while os.readlink(ns) == os.readlink("/proc/self/ns/mnt"):
            time.sleep(0.01)  # (until unshare has made it)
        system.unmount(target, device=dev, remove_mountpoint=True)
        assert not target.exists()
        backing = Path(f"/sys/dev/block/{dev.major}:{dev.minor}/loop/backing_file")
        try:
            still = backing.read_text().strip() == str(image)
        except OSError:
            still = False
        assert not still  # released when unmount returned, not later (or never)
        assert forced == []  # and by itself, not after a wait that ran out
    finally:
        holder.kill()
        holder.wait()
    assert _released(dev.major, dev.minor, image)
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    assert ours(work) == ([], [])


def test_waiting_for_a_release_says_whether_it_came(work: Path) -> None:
    """Recovery said "detached /dev/loopN" of a device still bound: the wait for its
    release gave up (after its own detach) without saying so."""
    image = _ext4(work / "held.img")
    att = loop.attach(image, readonly=True)
    try:
        # still open (ours): it stays bound, set to go on its last close
        assert system.wait_loop_released(att.major, att.minor, str(image), timeout=0.2) is False
    finally:
        os.close(att.fd)
    assert system.wait_loop_released(att.major, att.minor, str(image)) is True
