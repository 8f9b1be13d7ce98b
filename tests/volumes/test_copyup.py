"""Docker's copy-up into empty volumes, in a real pool: an image's top snapshot
(an ext4 disk written here) copied into volumes (ext4 disks) through the packer
and the applier, both chroot-ed."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots import Snapshotter
from ember.volumes import copyup
from ember.volumes.copyup import STAGED, STAGING, copy_up
from ember.volumes.errors import VolumeError
from ember.volumes.store import Volumes, volume_key
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
    (data / os.fsdecode(b"latin-\xe9")).write_text("not utf-8\n")
    (data / ("n" * 200)).write_text("long name\n")
    deep = data / "deep"
    deep.mkdir()
    path = deep
    for _ in range(300):  # deeper than tarfile's recursion would go by default
        path = path / "d"
    path.mkdir(parents=True)
    (path / "bottom").write_text("bottom\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(data / "sock"))  # left out: nothing can copy a socket
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


def _volume_tree(snap: Snapshotter, name: str) -> dict[str, object]:
    with snap.mount(volume_key(name)) as root:
        return {p.name: p.is_dir() for p in root.iterdir()}


def test_an_empty_volume_gets_the_image_files_at_its_target(snap: Snapshotter, outside: Path) -> None:
    Volumes(snap.home).create("vol")
    assert copy_up(snap, IMAGE, "vol", "/data")
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
        assert os.stat(vol / "sparse").st_blocks * 512 < 1 << 20  # written sparse
        assert not {STAGING, STAGED} & set(os.listdir(vol))
    assert (outside / "secret").read_text() == "host\n" and os.listdir(outside) == ["secret"]


def test_a_symlinked_target_is_resolved_inside_the_image(snap: Snapshotter, outside: Path) -> None:
    Volumes(snap.home).create("vol")
    assert copy_up(snap, IMAGE, "vol", "/up/data")
    with snap.mount(IMAGE) as image, snap.mount(volume_key("vol")) as vol:
        assert_same_tree(image / "data", vol, ignore=("lost+found", "sock"))


@pytest.mark.parametrize("target", ["/missing", "/file", "/escape", "/data/out", "/data/abs-link"])
def test_a_target_that_is_no_directory_of_the_image_copies_nothing(
    snap: Snapshotter, outside: Path, target: str
) -> None:
    Volumes(snap.home).create("vol")
    assert not copy_up(snap, IMAGE, "vol", target)
    assert _volume_tree(snap, "vol") == {"lost+found": True}
    assert os.listdir(outside) == ["secret"]


def test_a_volume_that_holds_anything_is_left_as_it_is(snap: Snapshotter) -> None:
    volumes = Volumes(snap.home)
    volumes.create("file")
    volumes.create("found")
    with snap.mount(volume_key("file")) as vol:
        (vol / "mine").write_text("mine\n")
    with snap.mount(volume_key("found")) as vol:
        (vol / "lost+found" / "#12").write_text("recovered by fsck\n")
    assert not copy_up(snap, IMAGE, "file", "/data")
    assert not copy_up(snap, IMAGE, "found", "/data")
    assert _volume_tree(snap, "file") == {"lost+found": True, "mine": False}
    assert _volume_tree(snap, "found") == {"lost+found": True}


def test_staging_names_a_guest_made_are_never_followed(snap: Snapshotter, outside: Path) -> None:
    """The volume was a guest's: its entries may be symlinks to host paths."""
    Volumes(snap.home).create("vol")
    with snap.mount(volume_key("vol")) as vol:
        os.symlink(str(outside), vol / STAGED)
        os.symlink(str(outside), vol / STAGING)
    assert not copy_up(snap, IMAGE, "vol", "/data")
    assert os.listdir(outside) == ["secret"]
    assert set(_volume_tree(snap, "vol")) == {"lost+found", STAGED, STAGING}


def test_a_copy_killed_while_staging_is_made_again(snap: Snapshotter) -> None:
    Volumes(snap.home).create("vol")
    with snap.mount(volume_key("vol")) as vol:
        (vol / STAGING / "half").mkdir(parents=True)
    assert copy_up(snap, IMAGE, "vol", "/data")
    with snap.mount(IMAGE) as image, snap.mount(volume_key("vol")) as vol:
        assert_same_tree(image / "data", vol, ignore=("lost+found", "sock"))


def test_a_copy_killed_while_moving_its_files_in_is_finished(
    snap: Snapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    Volumes(snap.home).create("vol")
    renames = []
    real_rename = os.rename

    def rename(src: str, dst: str, **kw: int) -> None:
        renames.append(src)
        if len(renames) == 5:  # the staging directory's rename, then three entries
            raise KeyboardInterrupt
        real_rename(src, dst, **kw)

    monkeypatch.setattr(copyup.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        copy_up(snap, IMAGE, "vol", "/data")
    monkeypatch.undo()
    assert STAGED in _volume_tree(snap, "vol")
    assert copy_up(snap, IMAGE, "vol", "/data")
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
    Volumes(pool_home).create("small", 64 << 20)
    with pytest.raises(VolumeError, match=r"volume small has no room for the image's files at /data") as e:
        copy_up(s, "big-top", "small", "/data")
    assert "nocopy" in (e.value.hint or "")
    assert _volume_tree(s, "small") == {"lost+found": True}
