"""compare_trees must catch a difference in every property it claims to compare."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.treecmp import assert_same_tree, compare_trees


def _base(root: Path) -> None:
    """A small tree with one of each kind of entry."""
    root.mkdir()
    (root / "etc").mkdir(mode=0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_bytes(b"\x7fELF" + b"x" * 100)
    os.symlink("busybox", root / "bin" / "sh")
    os.link(root / "bin" / "busybox", root / "bin" / "ls")
    (root / "data").write_bytes(b"abcd")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
    (root / "lost+found").mkdir()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    _base(a)
    _base(b)
    return a, b


def test_identical_trees_have_no_differences(trees: tuple[Path, Path]) -> None:
    a, b = trees
    assert compare_trees(a, b) == []
    assert_same_tree(a, b)


def _replace_with_fifo(r: Path) -> None:
    (r / "data").unlink()
    os.mkfifo(r / "data")


def _replace_with_dir(r: Path) -> None:
    (r / "data").unlink()
    (r / "data").mkdir()


def _retarget_symlink(r: Path) -> None:
    (r / "bin" / "sh").unlink()
    os.symlink("/bin/busybox", r / "bin" / "sh")


def _break_hardlink(r: Path) -> None:
    (r / "bin" / "ls").unlink()
    shutil.copy2(r / "bin" / "busybox", r / "bin" / "ls")


def _add_hardlink(r: Path) -> None:
    # same content and metadata as before, but now a second name of etc/passwd
    (r / "data").unlink()
    (r / "etc" / "passwd").write_bytes(b"abcd")
    os.link(r / "etc" / "passwd", r / "data")


def _change_rdev(r: Path) -> None:
    (r / "null").unlink()
    os.mknod(r / "null", 0o666 | 0o020000, os.makedev(1, 5))


def _chown_symlink(r: Path) -> None:
    os.chown(r / "bin" / "sh", 5, 5, follow_symlinks=False)


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    def mutate(r: Path) -> None:
        (r / rel).write_bytes(data)

    return mutate


def _chmod(rel: str, mode: int) -> Callable[[Path], None]:
    def mutate(r: Path) -> None:
        os.chmod(r / rel, mode)

    return mutate


def _chown(rel: str, uid: int, gid: int) -> Callable[[Path], None]:
    def mutate(r: Path) -> None:
        os.chown(r / rel, uid, gid)

    return mutate


def _unlink(rel: str) -> Callable[[Path], None]:
    def mutate(r: Path) -> None:
        (r / rel).unlink()

    return mutate


def _mkdir(rel: str) -> Callable[[Path], None]:
    def mutate(r: Path) -> None:
        (r / rel).mkdir()

    return mutate


def _setxattr(rel: str) -> Callable[[Path], None]:
    def mutate(r: Path) -> None:
        os.setxattr(r / rel, "user.k", b"v")

    return mutate


MUTATIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "extra file": (_write("etc/extra", b"x"), "only in b: etc/extra"),
    "missing file": (_unlink("data"), "only in a: data"),
    "file becomes dir": (_replace_with_dir, "data: type file != dir"),
    "file becomes fifo": (_replace_with_fifo, "data: type file != fifo"),
    "mode": (_chmod("data", 0o600), "data: mode"),
    "setuid": (_chmod("bin/busybox", 0o4755), "bin/busybox: mode"),
    "dir mode": (_chmod("etc", 0o700), "etc: mode"),
    "uid": (_chown("data", 1000, -1), "data: owner"),
    "gid": (_chown("data", -1, 2000), "data: owner"),
    "symlink owner": (_chown_symlink, "bin/sh: owner"),
    "size": (_write("data", b"abcde"), "data: size"),
    "content same size": (_write("data", b"abce"), "data: content differs"),
    "symlink target": (_retarget_symlink, "bin/sh: symlink target"),
    "hardlink broken": (_break_hardlink, "hardlink group"),
    "hardlink added": (_add_hardlink, "hardlink group"),
    "device numbers": (_change_rdev, "null: device"),
    "xattr added": (_setxattr("data"), "data: xattrs"),
    "empty dir added": (_mkdir("newdir"), "only in b: newdir"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_difference_is_caught(trees: tuple[Path, Path], name: str) -> None:
    a, b = trees
    mutate, expected = MUTATIONS[name]
    mutate(b)
    diffs = compare_trees(a, b)
    assert any(expected in d for d in diffs), diffs
    with pytest.raises(AssertionError, match="trees differ"):
        assert_same_tree(a, b)


def test_xattr_value_difference(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.setxattr(a / "data", "user.k", b"1")
    os.setxattr(b / "data", "user.k", b"2")
    assert any("data: xattrs" in d for d in compare_trees(a, b))
    assert compare_trees(a, b, xattrs=False) == []


def test_mtimes_only_when_asked(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.utime(b / "data", (1_000_000, 1_000_000))
    assert compare_trees(a, b) == []
    assert any("data: mtime" in d for d in compare_trees(a, b, mtimes=True))


def test_ignore_skips_subtree(trees: tuple[Path, Path]) -> None:
    a, b = trees
    (b / "lost+found" / "junk").write_text("x")
    assert compare_trees(a, b) == []
    assert compare_trees(a, b, ignore=()) == ["only in b: lost+found/junk (file)"]


def test_root_metadata_only_when_asked(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.chmod(b, 0o700)
    assert compare_trees(a, b) == []
    assert any(d.startswith(".: mode") for d in compare_trees(a, b, root_meta=True))


def test_symlink_to_dir_is_not_followed(trees: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = trees
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(str(outside), a / "escape")
    os.symlink(str(outside), b / "escape")
    assert compare_trees(a, b) == []
    (outside / "secret").write_text("changed")  # not part of either tree
    assert compare_trees(a, b) == []
