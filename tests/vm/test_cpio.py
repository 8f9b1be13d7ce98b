"""The newc writer checked against GNU cpio's reader (listing and extraction)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from ember.vm.cpio import CpioError, CpioWriter


def sample() -> bytes:
    w = CpioWriter()
    w.add_dir("dev")
    w.add_device("dev/console", "c", 5, 1, 0o600)
    w.add_dir("bin", 0o711)
    w.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    for size in range(0, 9):  # every padding remainder of names and data
        w.add_file(f"bin/f{'x' * size}", b"y" * size, 0o640, uid=1000, gid=50)
    w.add_symlink("bin/link", "../init")
    w.add_file("bin/big", os.urandom(70000) + b"end")
    return w.getvalue()


def test_listing_matches_gnu_cpio() -> None:
    data = sample()
    out = (
        subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    expected = ["dev", "dev/console", "bin", "init"]
    expected += [f"bin/f{'x' * s}" for s in range(9)] + ["bin/link", "bin/big"]
    assert out == expected


def test_extraction_matches_what_was_written(tmp_path: Path) -> None:
    data = sample()
    subprocess.run(
        ["cpio", "-i", "--quiet", "--make-directories", "--no-absolute-filenames"],
        input=data,
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    for size in range(9):
        p = tmp_path / "bin" / f"f{'x' * size}"
        st = p.stat()
        assert p.read_bytes() == b"y" * size
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 50)
    assert os.readlink(tmp_path / "bin" / "link") == "../init"
    assert (tmp_path / "bin" / "big").read_bytes().endswith(b"end")
    assert stat.S_IMODE((tmp_path / "bin").stat().st_mode) == 0o711
    console = (tmp_path / "dev" / "console").lstat()
    assert stat.S_ISCHR(console.st_mode)
    assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)


def test_reproducible_and_aligned() -> None:
    a = sample()[:1000]
    assert a == sample()[:1000]
    assert len(sample()) % 4 == 0


def test_concatenated_archives_extract_in_order(tmp_path: Path) -> None:
    first = CpioWriter()
    first.add_file("a", b"one")
    second = CpioWriter()
    second.add_dir("ember")
    second.add_file("ember/config", b"two")
    data = first.getvalue() + second.getvalue()
    # GNU cpio stops at the first trailer, as one archive per invocation; read both.
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True
    ).stdout.split()
    assert listing == [b"a"]
    rest = data[len(first.getvalue()) :]
    listing2 = subprocess.run(
        ["cpio", "-t", "--quiet"], input=rest, capture_output=True, check=True
    ).stdout.split()
    assert listing2 == [b"ember", b"ember/config"]


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "./a", "a/", "TRAILER!!!", "x\x00"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(CpioError):
        CpioWriter().add_file(name, b"")


def test_parent_must_exist_and_no_duplicates() -> None:
    w = CpioWriter()
    with pytest.raises(CpioError, match="before its directory"):
        w.add_file("d/f", b"")
    w.add_dir("d")
    w.add_file("d/f", b"")
    with pytest.raises(CpioError, match="duplicate"):
        w.add_file("d/f", b"")
    w.getvalue()
    with pytest.raises(CpioError):
        w.add_file("late", b"")
