"""Pure helpers: entry-name cleaning, whiteout classification, zero-block extents."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.unpack import InvalidLayer
from ember.unpack.compression import compression_of
from ember.unpack.paths import Whiteout, clean, parents, whiteout_of
from ember.unpack.sparse import HOLE_BLOCK, data_extents


@pytest.mark.parametrize(("name", "path"), [
    ("etc/passwd", "/etc/passwd"),
    ("./etc/passwd", "/etc/passwd"),
    ("/etc//passwd/", "/etc/passwd"),
    ("//etc", "/etc"),
    ("../../etc", "/etc"),
    ("/../etc", "/etc"),
    ("a/../../b", "/b"),
    (".", "/"),
    ("./", "/"),
    ("", "/"),
    ("a/..", "/"),
])
def test_clean(name: str, path: str) -> None:
    assert clean(name) == path


def test_clean_refuses_nul() -> None:
    with pytest.raises(InvalidLayer, match="NUL"):
        clean("a\x00b")


@given(st.text(alphabet="ab./", max_size=30))
def test_clean_never_leaves_the_root(name: str) -> None:
    path = clean(name)
    assert path.startswith("/")
    assert ".." not in path.split("/")
    assert "//" not in path


@pytest.mark.parametrize(("path", "expected"), [
    ("/a/.wh.b", Whiteout("file", "/a/b")),
    ("/.wh.b", Whiteout("file", "/b")),
    ("/a/.wh..wh..opq", Whiteout("opaque", "/a")),
    ("/.wh..wh..opq", Whiteout("opaque", "/")),
    ("/.wh..wh.plnk", Whiteout("meta", "/.wh..wh.plnk")),
    ("/.wh..wh.plnk/123", Whiteout("meta", "/.wh..wh.plnk/123")),
    ("/a/.wh...b", Whiteout("file", "/a/..b")),
    ("/a/b", None),
    ("/a/wh.b", None),
])
def test_whiteout_of(path: str, expected: Whiteout | None) -> None:
    assert whiteout_of(path, path) == expected


@pytest.mark.parametrize("path", ["/.wh.", "/a/.wh..", "/a/.wh..."])
def test_invalid_whiteouts(path: str) -> None:
    with pytest.raises(InvalidLayer, match="names no file"):
        whiteout_of(path, path)


def test_parents() -> None:
    assert parents("/a/b/c") == ["/a", "/a/b"]
    assert parents("/a") == []


def test_compression_of() -> None:
    assert compression_of("application/vnd.oci.image.layer.v1.tar+zstd") == "zstd"
    assert compression_of("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    assert compression_of("application/vnd.oci.image.layer.nondistributable.v1.tar") == "none"


def _apply_extents(buf: bytes, start: int, end: int, offset: int) -> bytes:
    """What the file holds after writing only the extents (holes read as zeros)."""
    out = bytearray(end - start)
    for s, e in data_extents(buf, start, end, offset):
        out[s - start:e - start] = buf[s:e]
    return bytes(out)


def test_extents_skip_only_aligned_zero_blocks() -> None:
    block = HOLE_BLOCK
    buf = b"x" * 100 + bytes(3 * block) + b"y" * 10
    ext = data_extents(buf, 0, len(buf), 0)
    # the first aligned zero block starts at file offset 4096
    assert ext == [(0, block), (3 * block, len(buf))]
    # the same data landing at an offset shifts the alignment
    # at file offset 100 the run covers file bytes [200, 12488): two whole blocks
    ext = data_extents(buf, 0, len(buf), 100)
    assert ext == [(0, block - 100), (3 * block - 100, len(buf))]


def test_extents_no_zero_block() -> None:
    buf = os.urandom(100_000)
    assert data_extents(buf, 10, 90_000, 0) == [(10, 90_000)]


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * HOLE_BLOCK)), max_size=12),
       st.integers(0, 3 * HOLE_BLOCK), st.integers(0, 50))
def test_extents_preserve_content(runs: list[tuple[bool, int]], offset: int, start: int) -> None:
    buf = b"p" * start + b"".join(bytes(n) if zero else b"\x01" * n for zero, n in runs)
    end = len(buf)
    assert _apply_extents(buf, start, end, offset) == buf[start:end]
    for s, e in data_extents(buf, start, end, offset):
        assert start <= s < e <= end
    # every hole is whole aligned blocks
    prev = start
    for s, e in data_extents(buf, start, end, offset) + [(end, end)]:
        if s > prev:
            assert (offset + prev - start) % HOLE_BLOCK == 0
            assert (s - prev) % HOLE_BLOCK == 0
        prev = e
