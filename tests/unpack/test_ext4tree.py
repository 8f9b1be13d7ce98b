"""Ext4Tree on its own: the kernel's errors, limits and encodings, checked by mounting
the image it wrote (the OCI semantics on top run in test_semantics/test_adversarial,
against both trees)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.snapshots import system
from ember.unpack import ext4tree
from ember.unpack.ext4tree import Ext4Tree, acl_mode

pytestmark = pytest.mark.root


@pytest.fixture
def image(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.ext4"
    system.mkfs_ext4(disk, 1 << 30)
    return disk


@contextlib.contextmanager
def mounted(image: Path, *, readonly: bool = True) -> Iterator[Path]:
    """The image loop-mounted by the kernel (after ``e2fsck -fn`` passed on it)."""
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    target = image.with_name("mnt")
    target.mkdir()
    device = system.mount_image(image, target, readonly=readonly)
    try:
        yield target
    finally:
        system.unmount(target, device=device, remove_mountpoint=True)


def _error(call: object, *args: object) -> int:
    with pytest.raises(OSError) as e:
        call(*args)  # type: ignore[operator]
    return e.value.errno


def test_calls_fail_as_the_kernels_do(image: Path) -> None:
    with Ext4Tree(image) as tree:
        tree.mkdir("/d", 0o755)
        tree.create_file("/d/f").close()
        tree.symlink("loop2", "/loop1")
        tree.symlink("loop1", "/loop2")
        assert _error(tree.mkdir, "/d", 0o755) == errno.EEXIST
        assert _error(tree.create_file, "/d/f") == errno.EEXIST
        assert _error(tree.create_file, "/missing/f") == errno.ENOENT
        assert _error(tree.create_file, "/d/f/g") == errno.ENOTDIR
        assert _error(tree.create_file, "/loop1/f") == errno.ELOOP
        assert _error(tree.create_file, "/" + "n" * 256) == errno.ENAMETOOLONG
        assert _error(tree.link, "/d", "/dlink") == errno.EPERM
        assert _error(tree.link, "/nothing", "/x") == errno.ENOENT
        assert _error(tree.unlink, "/d") == errno.EISDIR
        assert _error(tree.remove_tree, "/d/f") == errno.ENOTDIR
        assert _error(tree.setxattr, "/d/f", "bogus.name", b"v") == errno.EOPNOTSUPP
        assert _error(tree.setxattr, "/loop1", "user.x", b"v") == errno.EPERM
        assert _error(tree.symlink, "t" * 4096, "/long") == errno.ENAMETOOLONG
        assert tree.is_dir("/d") and not tree.is_dir("/d/f") and not tree.is_dir("/loop1")
    with mounted(image) as root:
        assert sorted(os.listdir(root)) == ["d", "loop1", "loop2", "lost+found"]


def test_symlinks_resolve_inside_the_image(image: Path) -> None:
    """Parents are followed through symlinks as in a chroot: an absolute target and ``..``
    past the root both stay in the image."""
    with Ext4Tree(image) as tree:
        tree.mkdir("/real", 0o755)
        tree.symlink("/real", "/abs")
        tree.symlink("../../../../real", "/dots")
        tree.symlink("t" * 100, "/slow")  # not in the inode: read from its block
        tree.mkdir("/" + "t" * 100, 0o755)
        tree.create_file("/abs/a").close()
        tree.create_file("/dots/b").close()
        tree.create_file("/slow/c").close()
    with mounted(image) as root:
        assert sorted(os.listdir(root / "real")) == ["a", "b"]
        assert os.listdir(root / ("t" * 100)) == ["c"]


def test_file_data_holes_and_sizes(image: Path) -> None:
    data = os.urandom(3 << 20) + bytes(1 << 20) + b"tail"
    with Ext4Tree(image) as tree:
        f = tree.create_file("/data")
        for start in range(0, len(data), 65536 + 7):  # writes not aligned to blocks
            f.write(data, start, min(start + 65536 + 7, len(data)))
        f.chmod(0o4755)
        f.chown(1000, 70000)
        f.utime(1_700_000_000_123_456_789)
        f.close()
        assert f.holes == 1 << 20
        sparse = tree.create_file("/sparse")
        sparse.seek(5 << 30)  # past 4 GiB: the size's high word
        sparse.write(b"x" * 10, 0, 10)
        sparse.finish((5 << 30) + 8192)
        sparse.close()
        tree.create_file("/empty").close()
    with mounted(image) as root:
        assert (root / "data").read_bytes() == data
        st = os.lstat(root / "data")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1000, 70000)
        assert st.st_mtime_ns == 1_700_000_000_123_456_789
        st = os.lstat(root / "sparse")
        assert st.st_size == (5 << 30) + 8192 and st.st_blocks <= 16
        with open(root / "sparse", "rb") as f:
            f.seek(5 << 30)
            assert f.read() == b"x" * 10 + bytes(8182)
        assert os.lstat(root / "empty").st_size == 0


@pytest.mark.parametrize("ns", [-5_000_000_001, 0, (1 << 31) * 1_000_000_000 + 42, (1 << 33) * 1_000_000_000])
def test_times_beyond_2038_and_before_1970(image: Path, ns: int) -> None:
    with Ext4Tree(image) as tree:
        tree.mkdir("/d", 0o755)
        tree.utime("/d", ns)
    with mounted(image) as root:
        assert os.lstat(root / "d").st_mtime_ns == ns


def test_devices_fifos_and_hard_links(image: Path) -> None:
    with Ext4Tree(image) as tree:
        tree.mknod("/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        tree.mknod("/big", stat.S_IFBLK | 0o600, os.makedev(300, 70000))  # the new encoding
        tree.mkfifo("/fifo", 0o640)
        tree.create_file("/f").close()
        tree.link("/f", "/g")
        tree.link("/g", "/h")
        tree.unlink("/g")
    with mounted(image) as root:
        assert os.lstat(root / "null").st_rdev == os.makedev(1, 3)
        assert os.lstat(root / "big").st_rdev == os.makedev(300, 70000)
        assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
        assert os.lstat(root / "f").st_nlink == 2
        assert os.lstat(root / "f").st_ino == os.lstat(root / "h").st_ino


def test_removing_a_tree_frees_its_blocks_and_inodes(image: Path) -> None:
    def free(root: Path) -> tuple[int, int]:
        st = os.statvfs(root)
        return st.f_bfree, st.f_ffree

    with mounted(image) as root:
        before = free(root)
    with Ext4Tree(image) as tree:
        for d in ("/t", "/t/a", "/t/a/b"):
            tree.mkdir(d, 0o755)
            f = tree.create_file(f"{d}/file")
            f.write(os.urandom(1 << 20), 0, 1 << 20)
            f.setxattr("user.big", os.urandom(3000))  # in a block of its own
            f.close()
        tree.create_file("/kept").close()
        tree.link("/t/a/b/file", "/kept-link")  # outlives the tree
    with Ext4Tree(image) as tree:
        tree.remove_tree("/t")
        tree.unlink("/kept")
    with mounted(image) as root:
        assert sorted(os.listdir(root)) == ["kept-link", "lost+found"]
        assert os.lstat(root / "kept-link").st_size == 1 << 20
        blocks, inodes = free(root)
        # what is left: one 1 MiB file, its xattr block and inode
        assert before[1] - inodes == 1
        assert 0 <= before[0] - blocks - (1 << 20) // 4096 <= 2


def test_a_full_image_says_no_space(tmp_path: Path) -> None:
    small = tmp_path / "small.ext4"
    system.mkfs_ext4(small, 64 << 20)
    with pytest.raises(OSError) as e, Ext4Tree(small) as tree:
        f = tree.create_file("/big")
        f.write(os.urandom(100 << 20), 0, 100 << 20)
        f.close()
    assert e.value.errno == errno.ENOSPC


def test_an_unhashed_directory_stops_at_the_kernels_link_limit(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ext4tree, "_LINK_MAX", 5)
    with Ext4Tree(image) as tree:
        tree.mkdir("/d", 0o755)
        for i in range(3):
            tree.mkdir(f"/d/{i}", 0o755)  # links: 2 + 3
        assert _error(tree.mkdir, "/d/3", 0o755) == errno.EMLINK
    with mounted(image) as root:
        assert os.lstat(root / "d").st_nlink == 5


def test_a_hashed_directory_past_65000_subdirectories_stays_at_one_link(image: Path) -> None:
    """The kernel counts such a directory's links as 1 (dir_nlink); a subdirectory added
    through libext2fs keeps it so (e2fsck checks)."""
    with mounted(image, readonly=False) as root:
        (root / "many").mkdir()
        for i in range(65_001):
            os.mkdir(root / "many" / str(i))
        assert os.lstat(root / "many").st_nlink == 1
    with Ext4Tree(image) as tree:
        tree.mkdir("/many/one-more", 0o755)
    with mounted(image) as root:
        assert os.lstat(root / "many").st_nlink == 1
        assert (root / "many/one-more").is_dir()


def test_acl_mode() -> None:
    def acl(*entries: tuple[int, int, int]) -> bytes:
        return (2).to_bytes(4, "little") + b"".join(
            t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
            for t, p, i in entries
        )

    assert acl_mode(acl((1, 6, 0), (4, 4, 0), (32, 0, 0)), "f") == (0o640, True)
    assert acl_mode(acl((1, 7, 0), (2, 5, 9), (4, 4, 0), (16, 5, 0), (32, 1, 0)), "f") == (0o751, False)
    assert acl_mode(acl((1, 7, 0), (4, 0, 0), (16, 3, 0), (32, 0, 0)), "f") == (0o730, False)
    for bad in (
        b"",
        (3).to_bytes(4, "little"),  # version
        acl((1, 6, 0), (4, 4, 0)),  # no "other"
        acl((1, 6, 0), (1, 6, 0), (4, 4, 0), (32, 0, 0)),  # two owners
        acl((1, 6, 0), (2, 6, 5), (4, 4, 0), (32, 0, 0)),  # a named entry, no mask
        acl((1, 8, 0), (4, 4, 0), (32, 0, 0)),  # a permission bit that does not exist
        acl((1, 6, 0), (4, 4, 0), (32, 0, 0)) + b"x",  # a torn entry
    ):
        assert _error(acl_mode, bad, "f") == errno.EINVAL
