"""ember.fsutil: the helpers every area shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.fsutil import NotRegularFile, atomic_write, open_regular, remove_tree, why_unopened


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
