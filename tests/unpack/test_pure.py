"""Pure helpers: entry-name cleaning, whiteout classification, zero-block extents, zstd framing."""

from __future__ import annotations

import os

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ember.unpack import InvalidLayer
from ember.unpack.compression import ZstdFrames, compression_of
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


def _entries_both_ways(raw: bytes) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    import io
    import tarfile

    from ember.unpack.tarstream import PipeReader, TarStream

    def key(i: tarfile.TarInfo) -> tuple[object, ...]:
        return (i.name, i.type, i.mode, i.uid, i.gid, i.size, i.mtime, i.linkname, i.devmajor, i.devminor,
                i.offset_data, {k: v for k, v in i.pax_headers.items() if k.startswith("SCHILY")})

    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        theirs = [key(i) for i in tf.getmembers()]
    r, w = os.pipe()
    try:
        os.write(w, raw)  # small archives: fits the pipe
        os.close(w)
        w = -1
        stream = TarStream(PipeReader(r))
        ours = []
        for e in stream:
            ours.append(key(e.info))
            for _ in stream.reader.chunks(e.data_size):
                pass
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    return ours, theirs


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_reader_decodes_like_tarfile(fmt: str) -> None:
    """The fast header path and tarfile's own decoder agree on every field."""
    import tarfile

    from tests.unpack.layers import dev, dir_, hard, reg, sym, tar_bytes

    entries = [
        dir_("etc/", mode=0o755), reg("etc/passwd", b"x" * 1000, mode=0o4755, uid=1000, gid=2000),
        reg("p" * 90 + "/" + "q" * 90, b"prefix-split name in ustar"), sym("l", "/abs/target"),
        hard("h", "etc/passwd"), dev("dev/null", tarfile.CHRTYPE, 1, 3), dev("f", tarfile.FIFOTYPE),
        reg("ünï", b"u", mtime=2_000_000_000), reg("empty", b""),
    ]
    if fmt != "ustar":
        entries.append(reg("big-uid", b"1", uid=3_000_000_000))
        entries.append(reg("n" * 300, b"long name", xattrs={"user.k": b"v"}))
    f = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    ours, theirs = _entries_both_ways(tar_bytes(entries, f))
    assert ours == theirs
    assert len(ours) == len(entries)


# -- zstd frame boundaries -------------------------------------------------------------


def _skippable(payload: bytes) -> bytes:
    return b"\x5a\x2a\x4d\x18" + len(payload).to_bytes(4, "little") + payload


def _streamed(data: bytes) -> bytes:
    """A frame as a stream writer makes it: no content size, a window descriptor."""
    out = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    return out.compress(data) + out.flush()


#: a frame header with every optional field: window descriptor, 2-byte dictionary id,
#: 8-byte content size, checksum flag; one raw last block of 5 bytes; the checksum
_FULL_HEADER = (b"\x28\xb5\x2f\xfd\xc6" + b"\x58" + b"\x01\x02" + (5).to_bytes(8, "little")
                + (5 << 3 | 1).to_bytes(3, "little") + b"hello" + b"\x00" * 4)
_TEXT = b"".join(b"line %d of some text\n" % i for i in range(20_000))

ZSTD_STREAMS = {
    "one-shot": [zstandard.ZstdCompressor().compress(_TEXT)],
    "checksum, no content size": [
        zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(_TEXT)],
    "streamed": [_streamed(_TEXT)],
    "RLE blocks": [zstandard.ZstdCompressor(write_checksum=True).compress(bytes(600_000))],
    "raw blocks": [zstandard.ZstdCompressor().compress(os.urandom(300_000))],
    "empty frame": [zstandard.ZstdCompressor().compress(b"")],
    "all header fields": [_FULL_HEADER],
    "frames and skippable frames": [_skippable(b"meta"), zstandard.ZstdCompressor().compress(_TEXT[:5000]),
                                    _skippable(b""), _streamed(_TEXT[5000:])],
}  # fmt: skip


def _fed(data: bytes | memoryview, step: int) -> ZstdFrames:
    frames = ZstdFrames()
    for i in range(0, len(data), step):
        frames.feed(data[i:i + step])
    return frames


@pytest.mark.parametrize("frames", ZSTD_STREAMS.values(), ids=ZSTD_STREAMS.keys())
def test_zstd_frames_tell_a_frame_boundary_from_a_cut(frames: list[bytes]) -> None:
    stream = b"".join(frames)
    for step in (len(stream), 1, 3, 4096):  # headers split across reads anywhere
        fed = _fed(stream, step)
        assert fed.complete and not fed.lost
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    near = {b + d for b in boundaries for d in range(-9, 10)}
    cuts = (set(range(1, len(stream), max(1, len(stream) // 300))) | near) - boundaries
    view = memoryview(stream)
    for cut in sorted(c for c in cuts if 0 < c < len(stream)):
        assert not _fed(view[:cut], 1 << 20).complete, cut


def test_zstd_frames_give_up_on_what_they_do_not_know() -> None:
    """A legacy frame or a reserved block type: the decompressor judges those bytes, the
    end is not checked."""
    legacy = _fed(b"\x27\xb5\x2f\xfd" + b"\x00" * 20, 1 << 20)
    reserved = _fed(b"\x28\xb5\x2f\xfd\x20\x05" + (3 << 1 | 1).to_bytes(3, "little"), 1 << 20)
    assert legacy.lost and legacy.complete
    assert reserved.lost and reserved.complete


@given(st.binary(max_size=20_000), st.integers(1, 9), st.booleans(), st.integers(1, 5000), st.data())
def test_zstd_frames_of_any_data(data: bytes, level: int, checksum: bool, step: int, draw: st.DataObject) -> None:
    stream = zstandard.ZstdCompressor(level=level, write_checksum=checksum).compress(data)
    assert _fed(stream, step).complete
    cut = draw.draw(st.integers(1, len(stream) - 1))
    assert not _fed(stream[:cut], step).complete
