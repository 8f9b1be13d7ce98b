"""Docker's copy-up into empty volumes, in a real pool: an image's top snapshot
(an ext4 disk written here) copied into volumes (ext4 disks) through the packer
and the applier, both chroot-ed."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.home import Home
from ember.snapshots import Snapshotter
from ember.volumes import copyup
from ember.volumes.copyup import STAGED, STAGING, attach, copy_up
from ember.volumes.errors import VolumeError
from ember.volumes.store import VolumeInfo, Volumes, volume_key
from tests.support.treecmp import assert_same_tree

pytestmark = [pytest.mark.root, pytest.mark.integration]

IMAGE = "image-top"


def _write_image(root: Path, outside: Path) -> None:
    """The image's files: /data with every kind of entry, and ways out of the root."""
    data = root / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / "sub" / "deeper" / "f").write_text("deep\n")
    (data / "owned").write_text("owned\n")
    os.chown(data / "owned", 1000, 2000)
    os.chmod(data / "owned", 0o640)
    (data / "suid").write_text("suid\n")
    os.chmod(data / "suid", 0o4755)
    (data / "setgid-dir").mkdir()
    os.chmod(data / "setgid-dir", 0o2775)
    (data / "a").write_text("linked\n")
    os.link(data / "a", data / "b")
    os.link(data / "a", data / "sub" / "c")
    os.symlink("/etc/passwd", data / "abs-link")  # kept as a link, never followed
    os.symlink(str(outside), data / "out")
    os.symlink("sub/deeper", data / "rel-link")
    os.mkfifo(data / "fifo")
    os.mknod(data / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (data / "xattr").write_text("x\n")
    os.setxattr(data / "xattr", "user.ember", b"kept\xff")
    (data / "cap").write_bytes(b"\x7fELF")
    # cap_net_bind_service=ep, as setcap writes it (VFS_CAP_REVISION_2)
    os.setxattr(data / "cap", "security.capability",
                bytes.fromhex("0100000200040000000000000000000000000000"))  # fmt: skip
    with open(data / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"middle")
    with open(data / "huge", "wb") as f:  # 2 GiB of holes, in a 1 GiB volume: copied sparse
        f.seek((2 << 30) - 5)
        f.write(b"end\n!")
    (data / os.fsdecode(b"latin-\xe9")).write_text("not utf-8\n")
    (data / ("n" * 200)).write_text("long name\n")
    deep = data / "deep"
    deep.mkdir()
    path = deep
    for _ in range(300):  # deeper than tarfile's recursion would go by default
        path = path / "d"
    path.mkdir(parents=True)
    (path / "bottom").write_text("bottom\n")
    here = os.getcwd()
    os.chdir(data)  # bound by a relative name: the mount's path may be too long for one
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("sock")  # left out: nothing can copy a socket
    finally:
        os.chdir(here)
    (data / "lost+found").mkdir()
    (data / "lost+found" / "image-file").write_text("the volume keeps its own\n")
    os.chown(data, 70, 71)
    os.chmod(data, 0o750)
    os.setxattr(data, "user.dir", b"on the directory")
    os.utime(data, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    (root / "file").write_text("not a directory\n")
    os.symlink("/", root / "up")  # /up/data is the image's /data, whatever the host has
    os.symlink(str(outside), root / "escape")  # names a host directory, not one of the image


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_text("host\n")
    return d


@pytest.fixture
def snap(pool_home: Home, outside: Path) -> Iterator[Snapshotter]:
    s = Snapshotter(pool_home)
    s.prepare("image-build", None, size=256 << 20)
    with s.mount("image-build") as root:
        _write_image(root, outside)
    s.commit(IMAGE, "image-build")
    yield s


def _new(snap: Snapshotter, name: str, size: int | None = None) -> VolumeInfo:
    made = Volumes(snap.home).create(name, size)
    assert made.pristine and made.copy_up is None
    return made


def _info(snap: Snapshotter, name: str) -> VolumeInfo:
    return Volumes(snap.home).get(name)


def _volume_tree(snap: Snapshotter, name: str) -> dict[str, object]:
    with snap.mount(volume_key(name)) as root:
        return {p.name: p.is_dir() for p in root.iterdir()}


def test_an_empty_volume_gets_the_image_files_at_its_target(snap: Snapshotter, outside: Path) -> None:
    assert copy_up(snap, IMAGE, _new(snap, "vol"), "/data")
    after = _info(snap, "vol")
    assert not after.pristine and after.copy_up is None and after.labels == {}
    assert not copy_up(snap, IMAGE, after, "/data")  # copied once: it holds something now
    with snap.mount(IMAGE) as image, snap.mount(volume_key("vol")) as vol:
        assert_same_tree(image / "data", vol, ignore=("lost+found", "sock"))
        assert not (vol / "sock").exists()
        # the volume's own lost+found stays, the image's does not replace it
        assert os.listdir(vol / "lost+found") == []
        dst = os.stat(vol)
        assert (dst.st_uid, dst.st_gid, stat.S_IMODE(dst.st_mode)) == (70, 71, 0o750)
        assert os.getxattr(vol, "user.dir") == b"on the directory"
        assert os.getxattr(vol / "cap", "security.capability") == os.getxattr(
            image / "data" / "cap", "security.capability"
        )
        assert os.stat(vol / "sparse").st_blocks * 512 <= 64 << 10  # written sparse
        assert os.stat(vol / "huge").st_size == 2 << 30 and os.stat(vol / "huge").st_blocks <= 64
        assert not {STAGING, STAGED} & set(os.listdir(vol))
    assert (outside / "secret").read_text() == "host\n" and os.listdir(outside) == ["secret"]


def test_a_symlinked_target_is_resolved_inside_the_image(snap: Snapshotter, outside: Path) -> None:
    assert copy_up(snap, IMAGE, _new(snap, "vol"), "/up/data")
    with snap.mount(IMAGE) as image, snap.mount(volume_key("vol")) as vol:
        assert_same_tree(image / "data", vol, ignore=("lost+found", "sock"))


@pytest.mark.parametrize("target", ["/missing", "/file", "/escape", "/data/out", "/data/abs-link"])
def test_a_target_that_is_no_directory_of_the_image_copies_nothing(
    snap: Snapshotter, outside: Path, target: str
) -> None:
    assert not copy_up(snap, IMAGE, _new(snap, "vol"), target)
    assert _volume_tree(snap, "vol") == {"lost+found": True}
    assert os.listdir(outside) == ["secret"]
    assert _info(snap, "vol").pristine  # a later run of another image may copy into it


def test_a_volume_a_machine_had_is_never_mounted_nor_copied_into(
    snap: Snapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest wrote it: what it holds (a file system tuned to panic the host's kernel,
    names that look like ember's) is not for the host to read."""
    had = _new(snap, "had")
    attach(snap, had)  # a machine's start
    with snap.mount(volume_key("had")) as vol:  # what its guest may have made there
        (vol / STAGED).mkdir()
        (vol / STAGED / "db").write_text("the guest's\n")
    subprocess.run(["tune2fs", "-e", "panic", str(_info(snap, "had").path)], check=True,
                   capture_output=True)  # fmt: skip
    mounts = []
    monkeypatch.setattr(Snapshotter, "mount", lambda self, key, **kw: mounts.append(key))
    assert not copy_up(snap, IMAGE, _info(snap, "had"), "/data")
    attach(snap, _info(snap, "had"))
    assert mounts == []
    monkeypatch.undo()
    with snap.mount(volume_key("had")) as vol:
        assert (vol / STAGED / "db").read_text() == "the guest's\n"


def test_an_image_entry_named_like_the_staging_directories_is_left_out(
    pool_home: Home
) -> None:
    s = Snapshotter(pool_home)
    s.prepare("named-build", None, size=128 << 20)
    with s.mount("named-build") as root:
        for name in ("file", STAGING, STAGED):
            (root / "data" / name).mkdir(parents=True)
            (root / "data" / name / "x").write_text(name)
    s.commit("named-top", "named-build")
    assert copy_up(s, "named-top", _new(s, "vol"), "/data")
    assert _volume_tree(s, "vol") == {"lost+found": True, "file": True}


@pytest.mark.parametrize("phase", ["staging", "moving"])
def test_a_copy_killed_midway_is_thrown_away_or_finished_by_the_next_attach(
    snap: Snapshotter, phase: str
) -> None:
    """SIGKILL while it staged, or while it moved files in (a forked copy kills itself
    there): the labels say which, and the next run or start acts on them, not on names."""
    volume = _new(snap, "vol")
    pid = os.fork()
    if pid == 0:  # the copy, killed midway
        try:
            if phase == "moving":
                def move_one_then_die(vol: Path) -> None:
                    os.rename(vol / STAGING, vol / STAGED)
                    os.rename(vol / STAGED / "a", vol / "a")
                    os.sync()  # on the disk, as after a while it would be
                    os.kill(os.getpid(), signal.SIGKILL)

                copyup._move_in = move_one_then_die  # type: ignore[assignment]
            else:
                real = copyup.apply_streams

                def stage_then_die(*args: Any, **kw: Any) -> None:
                    real(*args, **kw)
                    os.sync()
                    os.kill(os.getpid(), signal.SIGKILL)

                copyup.apply_streams = stage_then_die  # type: ignore[assignment]
            copy_up(Snapshotter(snap.home), IMAGE, volume, "/data")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    snap = Snapshotter(snap.home)  # a new command: it cleans up the dead one's mounts
    pending = _info(snap, "vol")
    assert pending.pristine and pending.copy_up == phase
    if phase == "staging":
        assert _volume_tree(snap, "vol") == {"lost+found": True, STAGING: True}
        attach(snap, pending)  # a start (a nocopy run too) throws it away
        assert _volume_tree(snap, "vol") == {"lost+found": True}
        assert not _info(snap, "vol").pristine
        return
    assert copy_up(snap, IMAGE, pending, "/data")  # the next run finishes it
    after = _info(snap, "vol")
    assert not after.pristine and after.copy_up is None
    with snap.mount(IMAGE) as image, snap.mount(volume_key("vol")) as vol:
        assert_same_tree(image / "data", vol, ignore=("lost+found", "sock"))
        assert stat.S_IMODE(os.stat(vol).st_mode) == 0o750


def test_a_copy_that_does_not_fit_leaves_the_volume_empty(pool_home: Home) -> None:
    s = Snapshotter(pool_home)
    s.prepare("big-build", None, size=256 << 20)
    with s.mount("big-build") as root:
        (root / "data").mkdir()
        (root / "data" / "small").write_text("small\n")
        with open(root / "data" / "big", "wb") as f:
            for _ in range(100):
                f.write(os.urandom(1 << 20))
    s.commit("big-top", "big-build")
    with pytest.raises(VolumeError, match=r"volume small \(64 MiB\) has no room for the image's files at /data") as e:
        copy_up(s, "big-top", _new(s, "small", 64 << 20), "/data")
    assert "nocopy" in (e.value.hint or "") and "ember volume rm small" in (e.value.hint or "")
    assert _volume_tree(s, "small") == {"lost+found": True}
    assert _info(s, "small").pristine and _info(s, "small").copy_up is None
