"""Archives that tarfile and Go's archive/tar (Docker, containerd, umoci) would read
differently are refused: the files ember unpacks are the ones Docker shows, never a
file hidden from it (or a different owner) through a header only one reader
understands as written.

Each archive here is assembled block by block: no tar writer makes these."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from ember.unpack import InvalidLayer
from tests.unpack.layers import Layers, dir_, tar_bytes

pytestmark = pytest.mark.usefixtures("each_applier_child")

BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def header(name: bytes, type_: bytes, *, size: int | bytes = 0, mode: bytes = b"0000644\x00",
           uid: bytes = b"0000000\x00", gnu: bool = False, extra: dict[int, bytes] | None = None) -> bytes:
    """One header block, its checksum right; ``size`` may be raw field bytes."""
    b = bytearray(BLOCK)
    b[0:len(name)] = name
    b[100:108] = mode
    b[108:116] = uid
    b[116:124] = b"0000000\x00"
    b[124:136] = size if isinstance(size, bytes) else _octal(size, 12)
    b[136:148] = _octal(1_700_000_000, 12)
    b[156:157] = type_
    b[257:265] = b"ustar  \x00" if gnu else b"ustar\x0000"
    for at, raw in (extra or {}).items():
        b[at:at + len(raw)] = raw
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\x00 " % sum(b)
    return bytes(b)


def data(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % BLOCK)


END = bytes(2 * BLOCK)


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        text = f" {key}={value}\n".encode()
        n = len(text) + 1
        while len(str(n)) + len(text) != n:
            n += 1
        body += str(n).encode() + text
    return header(b"PaxHeaders/x", tarfile.XHDTYPE, size=len(body)) + data(body)


def long_name(name: bytes, type_: bytes = tarfile.GNUTYPE_LONGNAME) -> bytes:
    return header(b"././@LongLink", type_, size=len(name) + 1, gnu=True) + data(name + b"\x00")


def test_a_size_after_a_nul_is_refused(root: Path, layers: Layers) -> None:
    """tarfile read this size as 0 and took the file's data for the next header (an
    ld.so.preload only ember unpacked); Go reads 1024 and the motd holds that data."""
    hidden = header(b"etc/ld.so.preload", tarfile.REGTYPE, size=12) + data(b"/lib/evil.so")
    assert len(hidden) == 1024
    raw = header(b"etc/motd", tarfile.REGTYPE, size=b"\x00" + _octal(0o2000, 11)) + hidden + END
    with pytest.raises(InvalidLayer, match="invalid tar header at offset 0: a numeric field"):
        layers.apply(root, raw)
    assert not (root / "etc").exists()


def test_an_owner_after_a_nul_is_refused(root: Path, layers: Layers) -> None:
    """tarfile: uid 0 on a setuid file; Go: uid 1000."""
    raw = header(b"suid", tarfile.REGTYPE, size=1, mode=b"0004755\x00", uid=b"\x00" + _octal(1000, 7))
    with pytest.raises(InvalidLayer, match="a numeric field"):
        layers.apply(root, raw + data(b"x") + END)
    assert not (root / "suid").exists()


@pytest.mark.parametrize("field", [b"+0000644", b"0_000644", b"00006 44"])
def test_numbers_go_refuses_are_refused(field: bytes, root: Path, layers: Layers) -> None:
    """tarfile's int() takes a sign, underscores and (with a NUL after) inner spaces."""
    with pytest.raises(InvalidLayer, match="a numeric field"):
        layers.apply(root, header(b"f", tarfile.REGTYPE, mode=field) + END)


def test_two_gnu_long_names_are_refused(root: Path, layers: Layers) -> None:
    """tarfile kept the first, Go keeps the last."""
    raw = long_name(b"a-first") + long_name(b"b-second") + header(b"x", tarfile.REGTYPE) + END
    with pytest.raises(InvalidLayer, match="two GNU long names"):
        layers.apply(root, raw)
    assert os.listdir(root) == []


def test_a_pax_name_then_a_gnu_long_name_is_refused(root: Path, layers: Layers) -> None:
    """tarfile took the pax path, Go the GNU long name."""
    raw = pax({"path": "from-pax"}) + long_name(b"from-gnu") + header(b"x", tarfile.REGTYPE) + END
    with pytest.raises(InvalidLayer, match="followed by a GNU long name"):
        layers.apply(root, raw)
    assert os.listdir(root) == []


def test_a_long_directory_name_on_an_old_file_type(root: Path, layers: Layers) -> None:
    """Type '\\0' with a name ending in "/" is a directory without data to Go, also when
    the name comes from an L record or a pax path; tarfile made a file and took the
    next header for its data (Go then unpacked an extra file, "hidden")."""
    hidden = header(b"hidden", tarfile.REGTYPE, size=4) + data(b"boo!")
    for name in (long_name(b"d/"), pax({"path": "e/"})):
        with pytest.raises(InvalidLayer, match="is a directory to some tar readers and a file"):
            layers.apply(root, name + header(b"x", tarfile.AREGTYPE, size=len(hidden)) + hidden + END)
    assert os.listdir(root) == []
    layers.apply(root, long_name(b"d/") + header(b"x", tarfile.AREGTYPE) + END)
    assert (root / "d").is_dir()


def test_entries_after_a_single_zero_block_are_refused(root: Path, layers: Layers) -> None:
    """Go refuses a zero block followed by anything but another (or the end); ember took
    the first zero block for the end and ignored the rest."""
    f = header(b"f", tarfile.REGTYPE, size=1) + data(b"1")
    g = header(b"g", tarfile.REGTYPE, size=1) + data(b"2")
    with pytest.raises(InvalidLayer, match="entries after a zero block"):
        layers.apply(root, f + bytes(BLOCK) + g + END)
    layers.apply(root, f + bytes(BLOCK))  # one zero block, then the end: Go's io.EOF
    layers.apply(root, f + END + g)  # two: the end, whatever follows
    assert sorted(os.listdir(root)) == ["f"]


def _old_gnu_sparse(name: bytes, regions: list[tuple[int, int]], real_size: bytes, stored: int,
                    extended: bool = False, raw_map: bytes | None = None) -> bytes:
    entries = raw_map if raw_map is not None else b"".join(
        _octal(off, 12) + _octal(n, 12) for off, n in regions)
    return header(name, tarfile.GNUTYPE_SPARSE, size=stored, gnu=True,
                  extra={386: entries, 482: b"\x01" if extended else b"\x00", 483: real_size})


def test_a_truncated_old_gnu_sparse_map_is_an_invalid_layer(root: Path, layers: Layers) -> None:
    """An IndexError inside tarfile: it reached the applier child's "internal error"
    path, which read source files inside the root (see test_confinement)."""
    raw = _old_gnu_sparse(b"s", [(0, 0)], _octal(4096, 12), 0, extended=True)
    with pytest.raises(InvalidLayer, match="ends in the middle of a tar header"):
        layers.apply(root, raw)


def test_an_old_gnu_sparse_file_past_int64_is_an_invalid_layer(root: Path, layers: Layers) -> None:
    """Real size 2**70 (base-256): an OverflowError in the child's ftruncate."""
    real_size = b"\x80" + (2**70).to_bytes(11, "big")
    raw = _old_gnu_sparse(b"s", [(0, 1)], real_size, 1) + data(b"x") + END
    with pytest.raises(InvalidLayer, match="has an invalid size"):
        layers.apply(root, raw)


def test_an_old_gnu_sparse_map_going_on_after_its_end_is_refused(root: Path, layers: Layers) -> None:
    """GNU tar and Go stop at the first entry without an offset; tarfile read on, so the
    file's data landed at other offsets than Docker's."""
    entries = _octal(0, 12) + _octal(4, 12) + bytes(24) + _octal(8192, 12) + _octal(4, 12)
    raw = _old_gnu_sparse(b"s", [], _octal(16384, 12), BLOCK, raw_map=entries) + data(b"abcdefgh") + END
    with pytest.raises(InvalidLayer, match="sparse map goes on after its end"):
        layers.apply(root, raw)
    # as GNU tar writes it: the map ends with empty entries
    good = _old_gnu_sparse(b"s", [(0, 4), (8192, 4)], _octal(16384, 12), BLOCK) + data(b"abcdefgh") + END
    layers.apply(root, good)
    content = (root / "s").read_bytes()
    assert (len(content), content[:4], content[8192:8196]) == (16384, b"abcd", b"efgh")


def test_a_directory_header_given_twice_keeps_the_last_time(root: Path, layers: Layers) -> None:
    """Its mode came from the last header, its mtime from the first; and each repeat
    grew a list in the child (400k repeats, 872 KiB gzipped: 90 MiB)."""
    layers.apply(root, tar_bytes([dir_("d", mode=0o700, mtime=1000), dir_("d", mode=0o755, mtime=2000)]))
    st = os.lstat(root / "d")
    assert (st.st_mode & 0o777, st.st_mtime) == (0o755, 2000)


HIDDEN = header(b"etc/ld.so.preload", tarfile.REGTYPE, size=12) + data(b"/lib/evil.so")


@pytest.mark.parametrize("records", [
    {"size": "1536", "GNU.sparse.realsize": "3"},
    {"size": "1536", "GNU.sparse.size": "3"},
    {"GNU.sparse.name": "etc/shadow"},
])  # fmt: skip
def test_gnu_sparse_records_on_a_member_go_does_not_take_for_sparse_are_refused(
    records: dict[str, str], root: Path, layers: Layers
) -> None:
    """tarfile applies GNU.sparse.size/.realsize/.name to any member, Go only to one it
    takes for sparse: the motd's data (a hidden ld.so.preload to ember) framed as 512
    bytes by one and 1536 by the other, or another name."""
    size = int(records.get("size", "3"))
    body = data(b"hi\n") + (HIDDEN if size > 512 else b"")
    raw = pax(records) + header(b"etc/motd", tarfile.REGTYPE, size=size) + body + END
    with pytest.raises(InvalidLayer, match="GNU sparse records on a member that is not sparse"):
        layers.apply(root, raw)
    assert os.listdir(root) == []


def test_an_old_style_directory_given_a_file_name_is_refused(root: Path, layers: Layers) -> None:
    """Type '\\0' named "d/" is a directory without data to tarfile; a long or pax name
    without the "/" makes it a file with its data to Go (the hidden entry is that data)."""
    for name in (long_name(b"etc/motd"), pax({"path": "etc/motd"})):
        raw = name + header(b"d/", tarfile.AREGTYPE, size=len(HIDDEN)) + HIDDEN + END
        with pytest.raises(InvalidLayer, match="a directory to some tar readers and a file"):
            layers.apply(root, raw)
    assert os.listdir(root) == []


def test_long_names_go_reads_otherwise_are_refused(root: Path, layers: Layers) -> None:
    """L, K, L: tarfile kept the first name, Go the last; L then g: Go returns the g as
    an entry and forgets the name."""
    chained = long_name(b"first/name") + long_name(b"t", tarfile.GNUTYPE_LONGLINK) + long_name(b"second/name")
    with pytest.raises(InvalidLayer, match="two GNU long names of one kind"):
        layers.apply(root, chained + header(b"x", tarfile.REGTYPE) + END)
    with pytest.raises(InvalidLayer, match="followed by a global header"):
        layers.apply(root, long_name(b"etc/shadow") + header(b"PaxHeaders/g", tarfile.XGLTYPE)
                     + header(b"short", tarfile.REGTYPE) + END)  # fmt: skip
    assert os.listdir(root) == []


def test_the_prefix_field_counts_only_in_ustar_headers(root: Path, layers: Layers) -> None:
    """In a GNU header bytes 345-500 are atime and ctime (`tar --format=gnu -G` fills
    them): tarfile joined them to the name as a "prefix" ("15303175061/small")."""
    atime = _octal(1_700_000_000, 12)
    raw = header(b"small", tarfile.REGTYPE, size=1, gnu=True, extra={345: atime, 357: atime})
    layers.apply(root, raw + data(b"x") + END)
    assert os.listdir(root) == ["small"]
