"""The snapshotter on a real XFS pool file, real loop devices and real ext4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from ember.home import Home
from ember.locks import FileLock
from ember.snapshots import Kind, Snapshotter, names, system
from ember.snapshots.errors import (
    InvalidDiskSize,
    SnapshotError,
    SnapshotExists,
    SnapshotInUse,
    SnapshotNotFound,
)
from ember.snapshots.model import Meta
from ember.snapshots.pool import LOOPFILE, close_pool
from tests.snapshots.leaks import ours

pytestmark = [pytest.mark.root, pytest.mark.integration]

A = "sha256:" + "a" * 64


def _commit_with(snap: Snapshotter, name: str, parent: str | None, files: dict[str, bytes]) -> None:
    key = f"build/{name}"
    snap.prepare(key, parent)
    with snap.mount(key) as root:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    snap.commit(name, key)


def test_pool_is_a_loop_mounted_xfs_with_reflinks(home: Home) -> None:
    snap = Snapshotter(home)
    assert snap.pool.kind == LOOPFILE and snap.pool.reflink and snap.pool.backend.name == "reflink"
    entry = next(m for m in system.mounts() if m.mountpoint == snap.pool.root)
    assert entry.fstype == "xfs"
    state = json.loads((home.snapshots / "pool.json").read_text())
    assert state["kind"] == LOOPFILE and state["size"] == 4 << 30
    assert os.stat(home.snapshots / "pool.img").st_blocks * 512 < 200 << 20  # sparse


def test_pool_is_mounted_again_after_a_reboot(home: Home) -> None:
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {"f": b"kept"})
    close_pool(home)  # what a reboot does to the mount
    assert not system.is_mountpoint(snap.pool.root)
    again = Snapshotter(home)
    assert again.is_committed(A)
    with again.mount(A) as root:
        assert (root / "f").read_bytes() == b"kept"


def test_a_pool_file_moved_and_symlinked_back_is_its_own_mount(home: Home, tmp_path: Path) -> None:
    """The pool file moved to a bigger disk and symlinked: the first command after the
    reboot mounted it, every later one said it was mounted from another device (the
    kernel names the resolved file)."""
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {"f": b"kept"})
    close_pool(home)
    image = snap.pool.image
    assert image is not None
    moved = tmp_path / "bigger-disk" / image.name
    moved.parent.mkdir()
    os.rename(image, moved)
    image.symlink_to(moved)
    Snapshotter(home)  # mounts it again
    again = Snapshotter(home)  # finds it mounted
    with again.mount(A) as root:
        assert (root / "f").read_bytes() == b"kept"


def test_a_lost_pool_json_never_reformats_the_pool(home: Home) -> None:
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {"f": b"kept"})
    close_pool(home)
    (home.snapshots / "pool.json").unlink()
    again = Snapshotter(home)
    assert again.pool.kind == LOOPFILE and again.is_committed(A)


def test_prepare_commit_view_lifecycle(home: Home) -> None:
    snap = Snapshotter(home)
    active = snap.prepare("k1")
    assert active.kind is Kind.ACTIVE and active.parent is None and active.path.is_file()
    assert system.fs_size(active.path) == 1 << 30  # base_size from the config
    with snap.mount("k1") as root:
        (root / "hello").write_text("world")
        assert snap.stat("k1").kind is Kind.ACTIVE
        with pytest.raises(SnapshotInUse):
            snap.commit(A, "k1")  # mounted (and locked)
    info = snap.commit(A, "k1")
    assert info.kind is Kind.COMMITTED and info.name == A
    assert not snap.exists("k1")
    assert os.stat(info.path).st_mode & 0o777 == 0o444

    snap.view("v1", A)
    assert snap.stat("v1").kind is Kind.VIEW
    with snap.mount("v1") as root:
        assert (root / "hello").read_text() == "world"
        with pytest.raises(OSError):
            (root / "new").write_text("x")
    with pytest.raises(SnapshotError, match="only active"):
        snap.commit("sha256:" + "b" * 64, "v1")

    child = snap.prepare("k2", A, size=2 << 30)
    assert system.fs_size(child.path) == 2 << 30
    with snap.mount("k2") as root:
        assert (root / "hello").read_text() == "world"
        (root / "hello").write_text("changed")
    with snap.mount(A) as root:  # the parent never changes
        assert (root / "hello").read_text() == "world"
    subprocess.run(["e2fsck", "-fn", str(child.path)], check=True, capture_output=True)

    names = {s.name: s for s in snap.list()}
    assert set(names) == {A, "v1", "k2"}
    assert names["k2"].parent == A and names["v1"].kind is Kind.VIEW
    assert snap.mounts("k2")[0].options == ("loop", "rw")
    assert "ro" in snap.mounts(A)[0].options


def test_errors_are_clear(home: Home) -> None:
    snap = Snapshotter(home)
    snap.prepare("k")
    with pytest.raises(SnapshotExists):
        snap.prepare("k")
    with pytest.raises(SnapshotNotFound, match="does not exist"):
        snap.prepare("k2", "sha256:" + "9" * 64)
    with pytest.raises(SnapshotError, match="not committed"):
        snap.prepare("k3", "k")
    with pytest.raises(SnapshotNotFound):
        snap.remove("nope")
    snap.commit(A, "k")
    snap.prepare("k4", A)
    snap.prepare("k5")
    with pytest.raises(SnapshotExists):
        snap.commit(A, "k5")
    with pytest.raises(SnapshotInUse, match="parent of 1"):
        snap.remove(A)
    snap.remove("k4")
    snap.remove("k5")
    snap.remove(A)
    assert snap.list() == []


def test_a_held_snapshot_cannot_be_removed(home: Home) -> None:
    snap = Snapshotter(home)
    _active, lock = snap.prepare_held("build/x", None)
    try:
        with pytest.raises(SnapshotInUse):
            snap.remove("build/x")
    finally:
        lock.release()
    _commit_with(snap, A, None, {})
    with snap.mount(A), pytest.raises(SnapshotInUse):
        snap.remove(A)
    snap.remove(A)


def test_clones_share_blocks(home: Home) -> None:
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {"big": os.urandom(1 << 20) * 64})
    parent_usage = snap.usage(A)
    assert parent_usage.size > 64 << 20
    before = _pool_used(snap)
    for i in range(5):
        snap.prepare(f"m{i}", A)
    # five full clones of a 64 MiB file system cost (almost) nothing
    assert _pool_used(snap) - before < 8 << 20
    u = snap.usage("m0")
    assert u.size >= 64 << 20 and u.exclusive < 1 << 20
    with snap.mount("m0") as root:
        (root / "big").write_bytes(b"y" * (4 << 20))
    assert snap.usage("m0").exclusive >= 4 << 20


def _pool_used(snap: Snapshotter) -> int:
    os.sync()
    st = os.statvfs(snap.pool.root)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_copy_backend_makes_real_copies(copy_home: Home) -> None:
    snap = Snapshotter(copy_home)
    assert snap.pool.backend.name == "copy"
    _commit_with(snap, A, None, {"f": b"content" * 1000})
    snap.prepare("c", A, size=(1 << 30) + (256 << 20))
    with snap.mount("c") as root:
        assert (root / "f").read_bytes() == b"content" * 1000
    assert snap.usage("c").exclusive == snap.usage("c").size  # nothing shared
    assert os.stat(snap.path("c")).st_blocks * 512 < 200 << 20  # holes kept


def test_recover_discards_abandoned_builds_only(home: Home) -> None:
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {})
    snap.prepare("machine/keep", A)  # not transient: a machine's disk survives recovery
    _active, lock = snap.prepare_held("build/dead", A)
    lock.release()  # as if its builder died
    _active, held = snap.prepare_held("build/alive", A)
    try:
        (snap.active_dir / ".new-0123456789abcdef").mkdir()
        (snap.active_dir / ".new-0123456789abcdef" / "lock").touch()
        actions = snap.recover()
        left = {s.name for s in snap.list()}
        assert left == {A, "machine/keep", "build/alive"}
        assert any("build/dead" in a for a in actions)
        assert not (snap.active_dir / ".new-0123456789abcdef").exists()
    finally:
        held.release()


def test_recover_unmounts_and_detaches_leftovers(home: Home) -> None:
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {"f": b"x"})
    _active, lock = snap.prepare_held("build/b", A)
    # a killed builder's state: its disk loop-mounted, and a bare loop device too
    target = snap.pool.mnt / "leftover"
    target.mkdir()
    system.mount_image(snap.path("build/b"), target, readonly=False)
    bare = subprocess.run(
        ["losetup", "--find", "--show", str(snap.path(A))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    lock.release()
    with FileLock(snap.pool.locks / "unrelated.lock"):
        actions = snap.recover()
    assert any("unmounted" in a for a in actions) and any(bare in a for a in actions)
    mounts, loops = ours(snap.pool.root)
    assert mounts == [] and loops == []
    assert not snap.exists("build/b") and snap.is_committed(A)


def test_stray_entries_in_the_pool_are_left_alone(home: Home) -> None:
    """A file in active/ made recovery (which every command runs) fail with
    NotADirectoryError, a file or an undecodable name in committed/ made `snapshot ls`
    and gc fail: they are no snapshots of ember's, said and skipped."""
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {})
    (snap.active_dir / "stray-file").write_text("x")
    (snap.committed_dir / "stray-file").write_text("x")
    (snap.committed_dir / "a%20b").mkdir()
    snap.recover()
    assert {s.name for s in snap.list()} == {A}
    assert (snap.active_dir / "stray-file").exists() and (snap.committed_dir / "a%20b").is_dir()
    (snap.active_dir / "stray-file").unlink()
    (snap.committed_dir / "stray-file").unlink()
    (snap.committed_dir / "a%20b").rmdir()


def test_entries_recovery_cannot_make_sense_of_are_left_alone(home: Home) -> None:
    """Recovery runs in every command that opens the store: one entry it stumbled on
    failed them all until someone mended the pool by hand.  A file named as a builder's
    (NotADirectoryError), a directory named as a builder's empty base (IsADirectoryError),
    and a committed record whose key is no key (InvalidSnapshotKey) are now left alone."""
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {})
    old = time.time() - 3600
    builder = snap.active_dir / ".new-x"
    builder.write_text("x")
    base = snap.bases / ".new-y"
    base.mkdir()
    os.utime(builder, (old, old))
    os.utime(base, (old, old))
    odd = snap.active_dir / "odd"
    odd.mkdir()
    meta = json.loads((snap.committed_dir / names.encode(A) / "meta.json").read_text())
    (odd / "meta.json").write_text(json.dumps({**meta, "key": ".evil"}))
    try:
        snap.recover()
        assert A in {s.name for s in snap.list()} and snap.is_committed(A)
        assert builder.is_file() and base.is_dir() and odd.is_dir()
    finally:
        builder.unlink()
        base.rmdir()
        shutil.rmtree(odd)


def test_a_snapshot_removed_as_it_is_looked_at_is_not_committed(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removed (gc, snapshot rm) between is_committed's look at its directory and the read
    of its metadata: a raw FileNotFoundError failed the prepare that asked."""
    snap = Snapshotter(home)
    _commit_with(snap, A, None, {})
    read_meta = snap._meta

    def removed_first(d: Path) -> Meta:
        shutil.rmtree(d)  # what a removal does between the two
        return read_meta(d)

    monkeypatch.setattr(snap, "_meta", removed_first)
    assert not snap.is_committed(A)


def test_a_symlink_in_place_of_a_snapshot_leads_nowhere(home: Home, tmp_path: Path) -> None:
    """Left alone by recovery and `snapshot ls` (no snapshot of ember's), it was still
    followed by the lookups: `snapshot rm` made its lock file in the directory it named,
    outside the pool, and a prepare would have cloned a disk from there."""
    snap = Snapshotter(home)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = snap.committed_dir / names.encode(A)
    link.symlink_to(outside)
    try:
        assert not snap.exists(A) and not snap.is_committed(A)
        with pytest.raises(SnapshotNotFound):
            snap.remove(A)
        with pytest.raises(SnapshotNotFound):
            snap.prepare("child", A)
        assert list(outside.iterdir()) == []
    finally:
        link.unlink()


def test_a_mount_waits_for_a_recovery_under_way(home: Home) -> None:
    """Recovery reads the loop devices, then the mounts: a mount made between the two
    looked like one nobody holds, and was unmounted under its builder.  Mounts take the
    recovery's lock shared."""
    import threading

    snap = Snapshotter(home)
    _commit_with(snap, A, None, {"f": b"x"})
    mounted = threading.Event()

    def mount() -> None:
        with snap.mount(A):
            mounted.set()

    with FileLock(snap.pool.locks / "recover.lock"):  # a recovery under way
        t = threading.Thread(target=mount)
        t.start()
        assert not mounted.wait(0.5)
    t.join(30)
    assert mounted.is_set()


def test_a_full_pool_is_no_missing_reflink(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from ember.snapshots import backends
    from ember.snapshots.errors import PoolError, SnapshotError

    snap = Snapshotter(home)
    _commit_with(snap, A, None, {})

    def reflink(_src: int, _dest: int, err: int = errno.ENOSPC) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(backends, "reflink", reflink)
    with pytest.raises(PoolError, match="no space left in the snapshot pool") as e:
        snap.prepare("machine/x", A)
    assert "backend to copy" not in str(e.value)
    monkeypatch.setattr(backends, "reflink", lambda s, d: reflink(s, d, errno.EOPNOTSUPP))
    with pytest.raises(SnapshotError, match="has no reflinks; set snapshots.backend to copy"):
        snap.prepare("machine/y", A)


def test_mount_is_released_on_error(home: Home) -> None:
    snap = Snapshotter(home)
    snap.prepare("k")
    with pytest.raises(RuntimeError), snap.mount("k"):
        raise RuntimeError("boom")
    mounts, loops = ours(snap.pool.root)
    assert mounts == [] and loops == []
    snap.remove("k")


def test_damaged_disk_fails_the_check(home: Home) -> None:
    snap = Snapshotter(home)
    snap.prepare("k")
    with open(snap.path("k"), "r+b") as f:  # clobber the group descriptors
        f.seek(4096)
        f.write(b"\xff" * 4096)
    with pytest.raises(SnapshotError, match="check"):
        snap.check("k")
    with open(snap.path("k"), "r+b") as f:  # and the superblock: it cannot be mounted
        f.seek(1024)
        f.write(b"\0" * 1024)
    with pytest.raises(SnapshotError, match="cannot mount"), snap.mount("k"):
        pass
    mounts, loops = ours(snap.pool.root)
    assert mounts == [] and loops == []
    assert list(snap.pool.mnt.iterdir()) == []


def test_native_reflink_directory_needs_no_pool_file(tmp_path: Path) -> None:
    """When $EMBER_HOME itself is on XFS with reflink, the pool is a plain directory."""
    from tests.snapshots.conftest import make_home, teardown_home

    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        h = make_home(mnt / "home")
        snap = Snapshotter(h)
        assert snap.pool.kind == "native" and snap.pool.backend.name == "reflink"
        assert not (h.snapshots / "pool.img").exists()
        _commit_with(snap, A, None, {"x": b"y"})
        snap.prepare("m", A)
        teardown_home(h)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_bad_sizes_are_refused(home: Home) -> None:
    snap = Snapshotter(home)
    for bad in (0, 4096, (1 << 30) + 1):
        with pytest.raises(InvalidDiskSize, match="disk size"):
            snap.prepare("k", size=bad)
    assert snap.list() == []


def test_a_disk_too_small_for_its_image_says_so(home: Home) -> None:
    """--disk-size 100M said only "cannot resize disk.ext4: after the aborted resize
    operation." (resize2fs' last line): the 8 GiB file system's own metadata does not
    fit in it, whatever little data the image holds."""
    snap = Snapshotter(home)
    data = b"x" * (96 << 20)
    _commit_with(snap, A, None, {"f": data})
    with pytest.raises(InvalidDiskSize, match=r"too small for this image: its file system needs at least \d"):
        snap.prepare("small", A, size=80 << 20)
    assert [s.name for s in snap.list()] == [A]
    snap.prepare("fits", A, size=256 << 20)
    with snap.mount("fits") as root:
        assert (root / "f").read_bytes() == data


def _cached_bases(snap: Snapshotter) -> list[Path]:
    return sorted(p for p in snap.bases.iterdir() if p.name.startswith("empty-"))


def test_new_bases_are_clones_of_one_cached_empty_disk(home: Home) -> None:
    snap = Snapshotter(home)
    # made with the pool, for the configured base size
    (cached,) = _cached_bases(snap)
    assert system.fs_size(cached) == snap.config.base_size
    assert cached.stat().st_mode & 0o777 == 0o444
    _commit_with(snap, A, None, {"a": b"1"})
    _commit_with(snap, "sha256:" + "b" * 64, None, {"b": b"2"})
    assert _cached_bases(snap) == [cached]  # reused, untouched by the disks cloned from it
    subprocess.run(["e2fsck", "-fn", cached], check=True, capture_output=True)
    for name in (A, "sha256:" + "b" * 64):
        subprocess.run(["e2fsck", "-fn", snap.path(name)], check=True, capture_output=True)
    # another size gets its own cached disk
    snap.prepare("other", None, size=512 << 20)
    assert len(_cached_bases(snap)) == 2
    assert system.fs_size(snap.path("other")) == 512 << 20
    snap.remove("other")


def test_a_damaged_cached_base_is_made_again(home: Home) -> None:
    snap = Snapshotter(home)
    (cached,) = _cached_bases(snap)
    os.chmod(cached, 0o644)
    with open(cached, "r+b") as f:  # scribble over the superblock
        f.seek(1024)
        f.write(b"\xff" * 64)
    _commit_with(snap, A, None, {"a": b"1"})
    (again,) = _cached_bases(snap)
    subprocess.run(["e2fsck", "-fn", again], check=True, capture_output=True)
    subprocess.run(["e2fsck", "-fn", snap.path(A)], check=True, capture_output=True)


def test_a_builder_clones_its_own_unfinished_snapshot(home: Home) -> None:
    """What a chain builder does: layer 2 starts from layer 1's disk before layer 1 is committed."""
    snap = Snapshotter(home)
    _l1, lock1 = snap.prepare_held("build/one", None)
    try:
        with snap.mount("build/one", held=lock1) as root:
            (root / "one").write_bytes(b"1")
        _l2, lock2 = snap.prepare_held("build/two", A, source="build/one")
        try:
            snap.commit(A, "build/one", held=lock1)
            with snap.mount("build/two", held=lock2) as root:
                assert (root / "one").read_bytes() == b"1"
                (root / "two").write_bytes(b"2")
            snap.commit("sha256:" + "c" * 64, "build/two", held=lock2)
        finally:
            lock2.release()
    finally:
        lock1.release()
    assert snap.stat("sha256:" + "c" * 64).parent == A
    with pytest.raises(SnapshotError, match="not a builder"):
        snap.prepare_held("build/three", A, source=A)  # a committed one is not a source
    assert not snap.exists("build/three")


def test_no_new_disk_when_the_host_under_the_pool_file_is_nearly_full(tmp_path: Path) -> None:
    """The pool file is thin: ember stops adding disks before the host file system under
    it fills (a block the host cannot place would be an I/O error for the whole pool)."""
    from ember.snapshots.errors import PoolError
    from tests.snapshots.conftest import make_home, teardown_home

    img = tmp_path / "host.img"
    with open(img, "wb") as f:
        f.truncate(768 << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(img)], check=True, capture_output=True)
    mnt = tmp_path / "host"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        h = make_home(mnt / "home", pool_size="512M", host_reserve="200M")
        snap = Snapshotter(h)
        assert snap.pool.kind == LOOPFILE
        _commit_with(snap, A, None, {"a": b"1"})
        st = os.statvfs(mnt)
        filler = mnt / "filler"
        subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (100 << 20)), filler],
                       check=True)  # fmt: skip
        with pytest.raises(PoolError, match="host_reserve") as refused:
            snap.prepare("machine-1", A)
        assert refused.value.hint and "ember gc" in refused.value.hint
        assert [i.name for i in snap.list()] == [A]  # nothing half-made
        filler.unlink()
        snap.prepare("machine-1", A)  # room again
        teardown_home(h)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_recover_keeps_a_leased_disk_whose_metadata_is_damaged(home: Home) -> None:
    snap = Snapshotter(home)
    snap.leases.create("machine/m1", snapshots=["machine/m1"])
    snap.prepare("machine/m1")
    snap.prepare("stale")  # not leased: garbage once its metadata is unreadable
    for key in ("machine/m1", "stale"):
        (snap.path(key).parent / "meta.json").write_bytes(b"{damaged")
    disk = snap.active_dir / "machine%2Fm1" / "disk.ext4"
    actions = snap.recover()
    assert disk.is_file(), "a machine's root disk was deleted for a bad meta.json"
    assert actions == ["discarded half-built snapshot stale"]
    (disk.parent / "meta.json").unlink()  # missing rather than damaged: the same
    assert snap.recover() == [] and disk.is_file()


@pytest.mark.parametrize("where", ["pool/trash", "pool/active", "mnt", "leases"])
def test_a_symlink_where_the_pool_keeps_a_directory_is_refused(
    home: Home, tmp_path: Path, where: str
) -> None:
    from ember.snapshots import snapshotter
    from ember.snapshots.errors import PoolError

    snap = Snapshotter(home)
    other = tmp_path / "not-embers"
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "f").write_text("x")
    os.utime(other / "sub", (0, 0))
    planted = home.snapshots / where
    os.rename(planted, planted.with_name(planted.name + ".away"))
    os.symlink(other, planted)
    snapshotter._recovered.discard(snap.pool.root)  # as in the next process
    with pytest.raises(PoolError, match=f"{where} is not a directory"):
        Snapshotter(home)
    assert (other / "sub" / "f").read_text() == "x"  # recovery emptied no one else's dir


@pytest.mark.parametrize("state", [{"kind": LOOPFILE}, {"kind": "native", "reflink": "no"}])
def test_a_damaged_pool_json_is_a_clear_error(home: Home, state: dict[str, object]) -> None:
    from ember.snapshots.errors import PoolError

    Snapshotter(home)
    (home.snapshots / "pool.json").write_text(json.dumps(state))
    with pytest.raises(PoolError, match="not a pool description"):
        Snapshotter(home)


def test_a_pool_left_mounted_after_its_files_were_removed_is_not_reused(home: Home) -> None:
    """``rm -rf`` of a state directory deletes pool.json and pool.img but cannot remove
    the mount point: the next command took the orphaned XFS for a native pool with
    reflinks, and stored everything in a deleted file."""
    from ember.snapshots.errors import PoolError

    snap = Snapshotter(home)
    if snap.pool.kind != LOOPFILE:
        pytest.skip("the state directory has reflinks itself: no pool file to delete")
    (home.snapshots / "pool.json").unlink()
    (home.snapshots / "pool.img").unlink()
    with pytest.raises(PoolError, match="still mounted from a deleted pool file") as e:
        Snapshotter(home)
    assert e.value.hint == f"unmount it (umount {snap.pool.root}) and run the command again"
    assert not (home.snapshots / "pool.json").exists()


@pytest.mark.parametrize("fixture", ["home", "copy_home"])
def test_a_machine_disk_is_fsynced_before_it_is_named(
    request: pytest.FixtureRequest, fixture: str, tmp_path: Path
) -> None:
    """A long-lived (non-transient) clone is on disk before its directory gets its
    name: the syscalls, as strace sees them, say fsync(disk) comes before the rename."""
    h: Home = request.getfixturevalue(fixture)
    _commit_with(Snapshotter(h), "base", None, {"f": b"x" * 100_000})
    script = (
        "import sys; from ember.home import Home; from ember.snapshots import Snapshotter;"
        "from pathlib import Path; Snapshotter(Home(Path(sys.argv[1]))).prepare('machine/m1', 'base')"
    )
    trace = tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-y", "-qq", "-e", "trace=fsync,rename", "-o", str(trace),
         sys.executable, "-c", script, str(h.root)],
        check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines = trace.read_text().splitlines()
    fsynced = [i for i, line in enumerate(lines) if "fsync(" in line and "/.new-" in line and "/disk.ext4>" in line]
    renamed = [i for i, line in enumerate(lines) if "rename(" in line and "/.new-" in line]
    assert fsynced and renamed, "\n".join(lines)
    assert fsynced[0] < renamed[-1]


def test_a_lease_made_while_rm_looks_is_never_missed(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`snapshot rm` (respect_leases) read the leases, then discarded the snapshot without
    the GC lock that every lease change takes shared: a prepare that leased it in between
    (to reuse it) lost it.  The lease now waits until the snapshot is gone (the prepare
    then builds it again)."""
    import threading

    snap = Snapshotter(home)
    _commit_with(snap, A, None, {})
    discard = snap._discard
    leased_in_between: list[bool] = []
    threads: list[threading.Thread] = []

    def lease_then_discard(d: Path) -> None:
        t = threading.Thread(target=snap.leases.create, args=("prepare/x",),
                             kwargs={"ttl": 60, "snapshots": [A]})  # fmt: skip
        t.start()
        t.join(0.5)
        leased_in_between.append(not t.is_alive())
        discard(d)
        threads.append(t)

    monkeypatch.setattr(snap, "_discard", lease_then_discard)
    snap.remove(A, respect_leases=True)
    threads[0].join(10)
    assert leased_in_between == [False], "a lease was made between rm's check and its discard"
    assert not snap.exists(A) and snap.leases.get("prepare/x").snapshots == (A,)
    # and a lease made before the look is seen: refused
    _commit_with(snap, A, None, {})
    with pytest.raises(SnapshotInUse, match="held by lease 'prepare/x'"):
        snap.remove(A, respect_leases=True)
    assert snap.exists(A)


def _busy_leftover_mount(home: Home) -> tuple[Snapshotter, Path, IO[str]]:
    """A snapshot mounted under the pool's mnt/ as a killed builder leaves it, and a file
    kept open in it (the caller closes it)."""
    snap = Snapshotter(home)
    snap.prepare("k")
    target = snap.pool.mnt / "leftover"
    target.mkdir()
    system.mount_image(snap.path("k"), target, readonly=False)
    return snap, target, open(target / "open-file", "w")  # noqa: SIM115


def _released_on_its_last_close(snap: Snapshotter) -> None:
    deadline = time.monotonic() + 10
    while ours(snap.pool.root)[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours(snap.pool.root) == ([], []), "released on its last user's close"


def test_recovery_does_not_wait_for_a_busy_leftover_mount(
    home: Home, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leftover mount a process keeps a file open in is detached lazily, and its loop
    device (autoclear) lives until that file is closed.  Every later recovery detached it
    again and waited 5 s for it under recover.lock, which every mount waits for."""
    import logging

    from ember.snapshots import loop

    snap, target, busy = _busy_leftover_mount(home)
    try:
        loop.umount(target, loop.MNT_DETACH)  # what the first recovery left of it
        target.rmdir()
        assert ours(snap.pool.root)[1], "the loop device should outlive the lazy unmount"
        waited: list[str] = []
        real_wait = system.wait_loop_released

        def wait_loop_released(major: int, minor: int, backing_file: str) -> None:
            waited.append(backing_file)
            real_wait(major, minor, backing_file)

        monkeypatch.setattr(system, "wait_loop_released", wait_loop_released)
        with caplog.at_level(logging.INFO, logger="ember.snapshots"):
            snap.recover()
        monkeypatch.undo()
        assert waited == [], "recovery waited for a device only its user can release"
        assert ours(snap.pool.root)[1], "a busy device is no leftover to detach"
        said = [r.getMessage() for r in caplog.records if "last process" in r.getMessage()]
        assert len(said) == 1 and str(snap.path("k")) in said[0], caplog.text
    finally:
        busy.close()
    _released_on_its_last_close(snap)


def test_recovery_detaches_a_busy_leftover_mount_after_a_few_tries(
    home: Home, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leftover mount something keeps busy (a file open in it) was tried 20 times and
    then waited for, ~10 s under recover.lock, in the first ember command to meet it."""
    import logging

    from ember.snapshots import loop, snapshotter

    snap, target, busy = _busy_leftover_mount(home)
    tries: list[int] = []
    real_umount = loop.umount

    def umount(path: Path, flags: int = 0) -> None:
        if path == target:
            tries.append(flags)
        real_umount(path, flags)

    try:
        monkeypatch.setattr(loop, "umount", umount)
        with caplog.at_level(logging.INFO, logger="ember.snapshots"):
            snap.recover()
        monkeypatch.undo()
        assert tries.count(0) == snapshotter.RECOVERY_UNMOUNT_ATTEMPTS
        assert tries[-1] == loop.MNT_DETACH  # then detached lazily: out of view
        assert not system.is_mountpoint(target)
        assert "still in use; detached lazily" in caplog.text
    finally:
        busy.close()
    _released_on_its_last_close(snap)


def test_a_build_committed_as_it_is_listed_is_no_stray(
    home: Home, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """list() and recover() list active/ and then look at each entry: a build committed
    in between (active/build%2F... renamed away) was warned about as "no snapshot of
    ember's"."""
    import logging

    from ember.snapshots import snapshotter

    snap = Snapshotter(home)
    _active, lock = snap.prepare_held("build/racing", None)
    real_listdir = os.listdir

    def listdir_then_commit(path: object) -> list[str]:
        found = real_listdir(path)  # type: ignore[call-overload]
        if path == snap.active_dir and snap.exists("build/racing"):
            snap.commit(A, "build/racing", held=lock)  # a concurrent commit, just then
        return found

    monkeypatch.setattr(snapshotter.os, "listdir", listdir_then_commit)
    try:
        with caplog.at_level(logging.WARNING, logger="ember.snapshots"):
            names = {s.name for s in snap.list()}
        # and it is listed once, committed: committed/ was read first, before the commit,
        # and the build was in neither listing (a removal's look for children missed it)
        assert "build/racing" not in names and A in names
    finally:
        monkeypatch.undo()
        lock.release()
    assert "no snapshot of ember's" not in caplog.text, caplog.text
    # a real stray is still said (a dangling symlink: lstat finds it)
    (snap.active_dir / "dangling").symlink_to("nowhere")
    with caplog.at_level(logging.WARNING, logger="ember.snapshots"):
        snap.recover()
    assert "dangling is no snapshot of ember's" in caplog.text
    (snap.active_dir / "dangling").unlink()
