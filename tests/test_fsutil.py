"""ember.fsutil: the helpers every area shares."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.fsutil import (
    NotRegularFile,
    atomic_write,
    empty_directory,
    open_regular,
    remove_tree,
    why_unopened,
)


def test_open_regular_refuses_what_is_not_a_file_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading without O_NONBLOCK waits for a writer
    for path in (fifo, tmp_path, Path("/dev/null")):
        with pytest.raises(NotRegularFile) as e:
            open_regular(path)
        assert e.value.filename == os.fspath(path) and e.value.strerror == "not a regular file"
        assert why_unopened(e.value) == "is not a regular file"
    with pytest.raises(FileNotFoundError) as missing:
        open_regular(tmp_path / "missing")
    assert why_unopened(missing.value) == "does not exist"
    assert why_unopened(PermissionError(13, "Permission denied")) == "cannot be read (Permission denied)"
    atomic_write(tmp_path / "f", b"data")
    with open_regular(tmp_path / "f") as f:
        assert f.read() == b"data"


_IN_OPEN = 0x20


def opened(path: Path) -> Callable[[], bool]:
    """Whether ``path`` was opened since this was called (inotify's IN_OPEN, which an
    O_PATH descriptor does not raise: it opens nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(path), _IN_OPEN) >= 0

    def any_open() -> bool:
        try:
            return bool(os.read(fd, 4096))
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    return any_open


def test_open_regular_opens_nothing_it_refuses(tmp_path: Path) -> None:
    """What is not a regular file was opened before its type was looked at: a device's
    driver ran (opening /dev/watchdog arms it; a FIFO stands in for it here), also for a
    file that ``vet`` refuses by where it is."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    was_opened = opened(fifo)
    with pytest.raises(NotRegularFile):
        open_regular(fifo)
    assert not was_opened()
    atomic_write(tmp_path / "f", b"data")
    was_opened = opened(tmp_path / "f")
    seen: list[str] = []

    def refuse(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise PermissionError(1, "refused")

    with pytest.raises(PermissionError):
        open_regular(tmp_path / "f", vet=refuse)
    assert seen == [str(tmp_path / "f")] and not was_opened()
    with open_regular(tmp_path / "f", vet=lambda fd: None) as f:
        assert f.read() == b"data"


def test_remove_tree_deeper_than_pythons_recursion(tmp_path: Path) -> None:
    """shutil.rmtree recurses per level: RecursionError past ~1000 (a layer can build
    3000 levels through a symlink into its deepest directory)."""
    root = tmp_path / "tree"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(3000):  # by descriptor: the whole path is longer than PATH_MAX
            os.mkdir("a", dir_fd=fd)
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    remove_tree(root)
    assert not root.exists()


def test_remove_tree_never_follows_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_text("x")
    tree = tmp_path / "tree"
    (tree / "wide").mkdir(parents=True)
    for i in range(50):
        (tree / "wide" / f"d{i}").mkdir()
        (tree / "wide" / f"d{i}" / "f").write_text("y")
    (tree / "link").symlink_to(outside)
    (tree / "wide" / "d7" / "link").symlink_to(outside / "sub")
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "sub" / "keep").read_text() == "x"


def test_empty_directory_keeps_the_directory_and_what_its_symlinks_point_at(
    tmp_path: Path,
) -> None:
    """What a failed ``ember image unpack`` does to a directory it was given."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("y")
    (tree / "link").symlink_to(outside)
    (tree / "a" / "link").symlink_to(outside / "keep")
    empty_directory(tree)
    assert tree.is_dir() and list(tree.iterdir()) == []
    assert (outside / "keep").read_text() == "x"
    (tmp_path / "to-tree").symlink_to(tree)
    with pytest.raises(OSError):  # not through a symlink to a directory either
        empty_directory(tmp_path / "to-tree")


def test_a_tree_walk_stops_where_a_directory_was_moved_out_from_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write in the tree (an image's 1777 /tmp) moves the directory the
    walk is in elsewhere: going back up through ".." would land there and remove, by the
    names still to do, what lies beside it (``elsewhere/victim/precious``)."""
    from ember import fsutil

    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    (tree / "tmp" / "A").mkdir(parents=True)
    (tree / "tmp" / "victim").mkdir()
    (elsewhere / "victim").mkdir(parents=True)
    (elsewhere / "victim" / "precious").write_text("x")
    a = (tree / "tmp" / "A").stat()
    real = fsutil._empty_but_subdirectories

    def racing(fd: int) -> list[str]:
        names = real(fd)
        here = os.fstat(fd)
        if (here.st_dev, here.st_ino) == (a.st_dev, a.st_ino):
            os.rename(tree / "tmp" / "A", elsewhere / "A")  # the walk is inside A now
        return sorted(names, key=lambda n: n == "A")  # A first (popped from the end)

    monkeypatch.setattr(fsutil, "_empty_but_subdirectories", racing)
    with pytest.raises(fsutil.MovedDuringRemoval):
        empty_directory(tree)
    assert (elsewhere / "victim" / "precious").read_text() == "x"


@pytest.mark.parametrize("clear", [empty_directory, remove_tree])
def test_a_directory_put_in_the_place_of_the_one_checked_is_left_alone(
    tmp_path: Path, clear: Callable[..., None]
) -> None:
    """What ``ember image unpack`` clears after a failure: the directory it made or
    checked, not one someone who can write beside it put there meanwhile."""
    from ember.fsutil import MovedDuringRemoval

    checked = tmp_path / "dir"
    checked.mkdir()
    before = os.lstat(checked)
    checked.rename(tmp_path / "moved")
    checked.mkdir()
    (checked / "theirs").write_text("x")
    with pytest.raises(MovedDuringRemoval):
        clear(checked, expect=before)
    assert (checked / "theirs").read_text() == "x"


def test_stale_temps_sweeps_only_old_temp_files_never_through_a_symlink(tmp_path: Path) -> None:
    """What ``atomic_write`` leaves when its writer is killed before the rename."""
    import time

    from ember.fsutil import stale_temps

    d = tmp_path / "d"
    d.mkdir()
    hour_ago = time.time() - 3600
    old = d / ".state.json.abcd1234.tmp"
    old.write_bytes(b"half")
    young = d / ".state.json.efgh5678.tmp"
    young.write_bytes(b"writing")
    kept = [d / "state.json", d / "name.tmp", d / ".hidden"]  # not named like its temp files
    for p in kept:
        p.write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.write_bytes(b"mine")
    link, subdir, fifo = (d / f".{n}.abcd1234.tmp" for n in ("link", "dir", "fifo"))
    link.symlink_to(outside)
    subdir.mkdir()
    os.mkfifo(fifo)
    for p in [old, *kept, link, subdir, fifo]:
        os.utime(p, (hour_ago, hour_ago), follow_symlinks=False)
    assert stale_temps(d, 600) == (1, 4) and old.exists()  # a dry run: counted only
    assert stale_temps(d, 600, remove=True) == (1, 4)
    assert not old.exists() and young.exists() and all(p.exists() for p in kept)
    assert link.is_symlink() and outside.read_bytes() == b"mine"
    assert subdir.is_dir() and fifo.exists()
    assert stale_temps(tmp_path / "missing", 600, remove=True) == (0, 0)


def test_stale_temps_follows_the_directory_only_when_told(tmp_path: Path) -> None:
    import time

    from ember.fsutil import stale_temps

    real = tmp_path / "real"
    real.mkdir()
    temp = real / ".f.abcd1234.tmp"
    temp.write_bytes(b"x")
    os.utime(temp, (time.time() - 3600,) * 2)
    (tmp_path / "link").symlink_to(real)
    assert stale_temps(tmp_path / "link", 600, remove=True) == (0, 0) and temp.exists()
    assert stale_temps(tmp_path / "link", 600, remove=True, follow=True) == (1, 1)
    assert not temp.exists()

