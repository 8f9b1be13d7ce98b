"""Compression, DiffID verification and malformed streams."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from ember.oci.digest import Digest
from ember.process import reap_exiting
from ember.unpack import (
    DiffIDMismatch,
    InvalidLayer,
    UnpackError,
    UnsupportedLayer,
    apply_layer,
)
from ember.unpack.tarstream import MAX_HEADER_BYTES
from tests.unpack.conftest import ApplierChild, own_children
from tests.unpack.layers import MEDIA, Layers, dir_, hard, reg, sym, tar_bytes

# every test here with the applier child forked by the apply, and with a spare
pytestmark = pytest.mark.usefixtures("each_applier_child")

ENTRIES = [dir_("etc"), reg("etc/os-release", b"ID=ember\n"), sym("bin", "usr/bin"), hard("etc/x", "etc/os-release"),
           reg("zeros", bytes(1 << 20))]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_each_compression_applies_and_reports_the_diff_id(compression: str, root: Path, layers: Layers) -> None:
    raw = tar_bytes(ENTRIES)
    blob, media_type, diff_id = layers.blob(raw, compression)
    stats = apply_layer(root, blob, media_type, diff_id)
    assert (root / "etc/os-release").read_bytes() == b"ID=ember\n"
    assert stats.diff_ids == (diff_id,)
    assert stats.tar_bytes == len(raw)


def test_large_multi_chunk_layer(root: Path, layers: Layers) -> None:
    # several MiB of data in many files crosses every buffer boundary
    files = [reg(f"d/f{i}", os.urandom(i * 997 % 300_000)) for i in range(60)]
    blob, media_type, diff_id = layers.blob(tar_bytes(files), "gzip")
    apply_layer(root, blob, media_type, diff_id)
    for e in files:
        assert (root / e.info.name).read_bytes() == e.data


def test_multi_member_gzip(root: Path, layers: Layers) -> None:
    raw = tar_bytes(ENTRIES)
    blob = layers.blobs / "multi.gz"
    blob.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    apply_layer(root, blob, MEDIA["gzip"], Digest.of(raw))
    assert (root / "etc/os-release").exists()


def test_diff_id_mismatch(root: Path, layers: Layers) -> None:
    blob, media_type, _ = layers.blob(tar_bytes(ENTRIES), "gzip")
    wrong = Digest.of(b"something else")
    with pytest.raises(DiffIDMismatch, match=str(wrong)):
        apply_layer(root, blob, media_type, wrong)


def test_sha512_diff_id(root: Path, layers: Layers) -> None:
    raw = tar_bytes(ENTRIES)
    blob, media_type, _ = layers.blob(raw, "zstd")
    stats = apply_layer(root, blob, media_type, Digest.of(raw, "sha512"))
    assert stats.diff_ids[0].algorithm == "sha512"


@pytest.mark.parametrize(
    "media_type",
    ["application/vnd.docker.image.rootfs.diff.tar.gzip",
     "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"],
)  # fmt: skip
def test_docker_media_types(root: Path, layers: Layers, media_type: str) -> None:
    raw = tar_bytes(ENTRIES)
    blob, _, diff_id = layers.blob(raw, "gzip")
    stats = apply_layer(root, blob, media_type, diff_id)
    assert stats.diff_ids == (diff_id,) and stats.tar_bytes == len(raw)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "bin", "etc", "etc/os-release", "etc/x", "zeros"]  # fmt: skip
    assert (root / "etc/os-release").read_bytes() == b"ID=ember\n"
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.path.samefile(root / "etc/x", root / "etc/os-release")
    assert (root / "zeros").read_bytes() == bytes(1 << 20)


def test_unsupported_media_type(root: Path, layers: Layers) -> None:
    blob, _, _ = layers.blob(tar_bytes(ENTRIES), "none")
    with pytest.raises(UnsupportedLayer, match="application/vnd.example"):
        apply_layer(root, blob, "application/vnd.example+bz2")


def test_media_type_contradicted_by_content(root: Path, layers: Layers) -> None:
    blob, _, _ = layers.blob(tar_bytes(ENTRIES), "none")
    with pytest.raises(InvalidLayer, match="not gzip"):
        apply_layer(root, blob, MEDIA["gzip"])
    with pytest.raises(InvalidLayer, match="not zstd"):
        apply_layer(root, blob, MEDIA["zstd"])
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_corrupt_compressed_stream(compression: str, root: Path, layers: Layers) -> None:
    blob, media_type, _ = layers.blob(tar_bytes(ENTRIES + [reg("big", os.urandom(300_000))]), compression)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data[: len(data) * 3 // 4]))
    with pytest.raises(UnpackError, match="layer"):
        apply_layer(root, blob, media_type)


@pytest.mark.parametrize("cut", [6, 100, 0.5, -2])  # header, block, middle, checksum
def test_a_truncated_zstd_blob_is_reported_as_such(cut: float, root: Path, layers: Layers) -> None:
    """zstandard's reader took a cut frame for the end of the data: the tar seemed to
    end early, or, cut in the frame's checksum, the layer applied."""
    raw = tar_bytes([reg("a", os.urandom(300_000)), reg("b", os.urandom(300_000))])
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    end = int(len(blob) * cut) if isinstance(cut, float) else cut
    path = layers.blobs / "cut.zst"
    path.write_bytes(blob[:end])
    with pytest.raises(InvalidLayer, match="cannot read layer cut.zst: zstd data ends in the middle of a frame"):
        apply_layer(root, path, MEDIA["zstd"], Digest.of(raw))


def test_zstd_frames_and_skippable_frames(root: Path, layers: Layers) -> None:
    raw = tar_bytes(ENTRIES)
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"meta"
    path = layers.blobs / "frames.zst"
    path.write_bytes(skippable + zstandard.ZstdCompressor().compress(raw[:5000]) + skippable
                     + zstandard.ZstdCompressor(write_checksum=True).compress(raw[5000:]))
    stats = apply_layer(root, path, MEDIA["zstd"], Digest.of(raw))
    assert stats.tar_bytes == len(raw) and (root / "etc/os-release").read_bytes() == b"ID=ember\n"


def test_truncated_tar(root: Path, layers: Layers) -> None:
    raw = tar_bytes([reg("big", os.urandom(100_000))])
    with pytest.raises(InvalidLayer, match="middle of a file"):
        layers.apply(root, raw[:50_000])
    with pytest.raises(InvalidLayer, match="middle of a tar header"):
        layers.apply(root, raw[:300])


def test_corrupt_header_is_not_taken_for_the_end(root: Path, layers: Layers) -> None:
    raw = bytearray(tar_bytes([reg("a", b"1"), reg("b", b"2")]))
    # the second member's header starts after a's header + one data block
    raw[1024 + 10] ^= 0x55
    with pytest.raises(InvalidLayer, match="invalid tar header"):
        layers.apply(root, bytes(raw))


def test_unsupported_entry_type(root: Path, layers: Layers) -> None:
    ti = tarfile.TarInfo("label")
    ti.type = b"V"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(ti)
    raw = buf.getvalue()
    with pytest.raises(InvalidLayer, match="unsupported tar type"):
        layers.apply(root, raw)


def test_nul_in_pax_path_is_refused(root: Path, layers: Layers) -> None:
    e = reg("placeholder", b"x")
    e.pax["path"] = "evil\x00name"
    with pytest.raises(InvalidLayer, match="NUL"):
        layers.apply(root, [e])


def test_huge_pax_header_is_refused(root: Path, layers: Layers) -> None:
    e = reg("x", b"1")
    e.pax["comment"] = "y" * (17 << 20)
    with pytest.raises(InvalidLayer, match="too large"):
        layers.apply(root, [e])


def test_missing_root_and_blob(tmp_path: Path, layers: Layers) -> None:
    blob, media_type, _ = layers.blob(tar_bytes(ENTRIES), "none")
    with pytest.raises(UnpackError, match="not a directory"):
        apply_layer(tmp_path / "nope", blob, media_type)
    (tmp_path / "r").mkdir()
    with pytest.raises(UnpackError, match="cannot read"):
        apply_layer(tmp_path / "r", tmp_path / "missing-blob", media_type)


def test_no_descriptor_leaks_and_no_children_left(
    root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    blob, media_type, diff_id = layers.blob(tar_bytes(ENTRIES), "gzip")
    for _ in range(3):
        apply_layer(root, blob, media_type, diff_id)
    with pytest.raises(InvalidLayer):
        layers.apply(root, [reg(".wh.", b"")])
    # (with a spare: it was used and is gone, its socket too; told to exit, it is
    # reaped off the caller's path, or at the latest by reap_exiting)
    assert frozenset(os.listdir("/proc/self/fd")) == each_applier_child.fds_before
    reap_exiting()
    assert own_children() == each_applier_child.children_before


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_members_are_written_sparse(fmt: str, tmp_path: Path, root: Path,
                                                   layers: Layers) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"in the middle")
        f.seek((64 << 20) - 5)
        f.write(b"end!!")
    tar_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(tar_path), "-C", str(src), "sparse.img"],
                   check=True)
    raw = tar_path.read_bytes()
    assert len(raw) < 1 << 20  # GNU tar stored it sparse
    stats = layers.apply(root, raw)
    out = root / "sparse.img"
    st = os.lstat(out)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20
    with open(out, "rb") as f:
        f.seek(1 << 20)
        assert f.read(13) == b"in the middle"
        f.seek((64 << 20) - 5)
        assert f.read() == b"end!!"
        f.seek(0)
        assert f.read(1 << 20) == bytes(1 << 20)
    assert stats.files == 1


def test_hardlink_to_a_directory_is_refused(root: Path, layers: Layers) -> None:
    with pytest.raises(InvalidLayer, match="cannot be linked"):
        layers.apply(root, [dir_("d"), hard("h", "d")])


def test_concurrent_applies_from_threads(tmp_path: Path, layers: Layers) -> None:
    """Callers (the snapshotter) may apply several layers at once from threads."""
    from concurrent.futures import ThreadPoolExecutor

    files = [reg(f"f{i}", os.urandom(200_000)) for i in range(20)]
    blob, media_type, diff_id = layers.blob(tar_bytes(files), "gzip")
    roots = [tmp_path / f"r{i}" for i in range(4)]
    for r in roots:
        r.mkdir()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: apply_layer(r, blob, media_type, diff_id), roots))
    assert all(s.files == 20 for s in results)
    for r in roots:
        assert (r / "f7").read_bytes() == files[7].data


def test_endless_chain_of_extended_headers(root: Path, layers: Layers) -> None:
    pax = tarfile.TarInfo._create_pax_generic_header({"comment": "x"}, tarfile.XHDTYPE, "utf-8")  # type: ignore[attr-defined]
    raw = pax * 3000 + tar_bytes([reg("a", b"1")])
    with pytest.raises(InvalidLayer, match="extended header|too large"):
        layers.apply(root, raw)


def test_symlink_loop_as_parent(root: Path, layers: Layers) -> None:
    with pytest.raises(UnpackError, match="a/x"):
        layers.apply(root, [sym("a", "b"), sym("b", "a"), reg("a/x", b"1")])


def test_diff_id_mismatch_stops_before_the_next_layer(
    root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    from ember.unpack import apply_layers

    first = layers.blob(tar_bytes([reg("a", b"1")]), "gzip")
    second = layers.blob(tar_bytes([reg("b", b"2")]), "gzip")
    third = layers.blob(tar_bytes([reg("c", b"3")]), "gzip")
    bad = (second[0], second[1], Digest.of(b"not this"))
    with pytest.raises(DiffIDMismatch):
        apply_layers(root, [first, bad, third])
    assert (root / "a").exists() and (root / "b").exists()  # applied while hashed
    assert not (root / "c").exists()
    assert frozenset(os.listdir("/proc/self/fd")) == each_applier_child.fds_before
    assert own_children() == each_applier_child.children_before


def test_invalid_middle_layer_stops_the_chain(root: Path, layers: Layers) -> None:
    with pytest.raises(InvalidLayer, match="layer2"):
        layers.apply(root, [reg("a", b"1")], [reg(".wh.", b"")], [reg("c", b"3")])
    assert (root / "a").exists()
    assert not (root / "c").exists()


def test_more_layers_than_one_child_takes(root: Path, layers: Layers) -> None:
    from ember.unpack.sandbox import MAX_LAYERS_PER_CHILD

    n = MAX_LAYERS_PER_CHILD + 6
    stats = layers.apply(root, *([reg("f", str(i).encode()), reg(f"d/{i}", b"")] for i in range(n)))
    assert stats.layers == n
    assert (root / "f").read_bytes() == str(n - 1).encode()
    assert len(os.listdir(root / "d")) == n


def test_a_layer_streamed_ahead_is_never_applied_after_a_failure(
    root: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    """The next layer is streamed while the child still applies the one before; when that
    one fails, the next (bigger than the pipe, so its writer blocks) is not applied and
    nothing hangs."""
    from ember.unpack import apply_layers

    first = layers.blob(tar_bytes([reg("a", b"1")]), "gzip")
    invalid = layers.blob(tar_bytes([reg(".wh.", b"")]), "gzip")
    big = layers.blob(tar_bytes([reg("c", os.urandom(3 << 20))]), "gzip")
    with pytest.raises(InvalidLayer):
        apply_layers(root, [first, (invalid[0], invalid[1], None), big])
    assert (root / "a").exists() and not (root / "c").exists()
    # a blob that cannot be inflated in the middle: its error, not the child's
    corrupt = layers.blob(tar_bytes([reg("b", os.urandom(300_000))]), "gzip")
    data = bytearray(corrupt[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt[0].write_bytes(bytes(data))
    with pytest.raises(UnpackError, match="cannot read|layer"):
        apply_layers(root, [first, (corrupt[0], corrupt[1], None), big])
    assert not (root / "c").exists()
    assert frozenset(os.listdir("/proc/self/fd")) == each_applier_child.fds_before
    assert own_children() == each_applier_child.children_before


def _session_pid(session: object) -> int:
    return session._session._pid  # type: ignore[attr-defined]


def test_a_session_applies_root_after_root_with_one_child(
    tmp_path: Path, layers: Layers, each_applier_child: ApplierChild
) -> None:
    """One child moves from root to root, and is never left inside one (it could not be unmounted)."""
    from ember.unpack import LayerSession

    roots = [tmp_path / f"r{i}" for i in range(3)]
    with LayerSession() as session:
        pids = set()
        for i, r in enumerate(roots):
            r.mkdir()
            blob = layers.blob(tar_bytes([reg("f", str(i).encode()), sym("abs", "/etc")]), "gzip")
            stats = session.apply(r, *blob)
            assert stats.layers == 1 and stats.diff_ids == (blob[2],)
            pid = _session_pid(session)
            pids.add(pid)
            assert os.readlink(f"/proc/{pid}/root") == "/"  # parked outside every root
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert len(pids) == 1
        for i, r in enumerate(roots):
            assert (r / "f").read_bytes() == str(i).encode()
            assert os.readlink(r / "abs") == "/etc"
        # a failure ends the child; the next layer gets a new one and applies
        bad = layers.blob(tar_bytes([reg("x", b"1")]), "gzip")
        with pytest.raises(DiffIDMismatch):
            session.apply(roots[0], bad[0], bad[1], Digest.of(b"other"))
        assert _session_pid(session) == -1
        with pytest.raises(InvalidLayer):
            session.apply(roots[1], *layers.blob(tar_bytes([reg(".wh.", b"")]), "gzip"))
        session.apply(roots[2], *layers.blob(tar_bytes([reg("g", b"2")]), "gzip"))
        assert (roots[2] / "g").read_bytes() == b"2"
        assert _session_pid(session) not in pids
    reap_exiting()  # closing told it to exit; it is reaped off the caller's path
    assert own_children() == each_applier_child.children_before
    assert frozenset(os.listdir("/proc/self/fd")) == each_applier_child.fds_before


def _pax_member(payload: bytes, type_: bytes = tarfile.XHDTYPE) -> bytes:
    """An extended (or global) header carrying ``payload`` as written, padded to a block."""
    ti = tarfile.TarInfo("PaxHeader")
    ti.type = type_
    ti.size = len(payload)
    return ti.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % tarfile.BLOCKSIZE)


@pytest.mark.timeout(60)
def test_long_digit_runs_in_pax_records_take_linear_time(root: Path, layers: Layers) -> None:
    # CVE-2024-6232: tarfile's record regexes are quadratic on runs of digits; 2 MiB
    # of them (a few KB gzipped) kept the applier busy for about an hour, the 1 MiB
    # that fit in MAX_HEADER_BYTES for a quarter of that
    e = reg("x", b"1")
    e.pax["comment"] = "1" * (MAX_HEADER_BYTES - 4096)
    layers.apply(root, [e], compression="gzip")
    assert (root / "x").read_bytes() == b"1"


def test_headers_past_gos_limit_are_refused(root: Path, layers: Layers) -> None:
    """Go's archive/tar reads at most 1 MiB of headers per entry (its fix for
    CVE-2022-2879); 16 MiB of sparse map became ~0.8 GB of Python ints here."""
    e = reg("x", b"1")
    e.pax["comment"] = "c" * (1 << 20)
    with pytest.raises(InvalidLayer, match="header"):
        layers.apply(root, [e], compression="gzip")


def test_global_pax_headers_are_ignored_as_go_does(root: Path, layers: Layers) -> None:
    # tarfile applies a global header to every later member; Go's archive/tar (Docker,
    # containerd, umoci) does not: the layer must give the files Go's readers see
    glob = tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
        {"path": "evil", "uid": "1234", "SCHILY.xattr.user.g": "1"}, tarfile.XGLTYPE, "utf-8")
    layers.apply(root, glob + tar_bytes([reg("a", b"1"), dir_("d"), reg("d/b", b"2")]))
    assert sorted(p.name for p in root.iterdir()) == ["a", "d"]
    for p in (root / "a", root / "d", root / "d/b"):
        assert os.lstat(p).st_uid == 0
        assert os.listxattr(p) == []


def _record(key: str, value: str) -> bytes:
    """One pax record, ``LENGTH KEY=VALUE\\n``, its length counting its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


@pytest.mark.parametrize("payload", [
    b"13 path=evil\nJUNK",  # bytes after the last record
    b"99 path=evil\n",  # a length beyond the header
    b"13 path=evilX",  # a record that does not end with a newline
    b"12 uid=abcd\n",  # tarfile reads a bad number as 0 (root)
    b"7 =abc\n",  # no key
    # more than 4300 digits: Python refuses to convert them, tarfile reads 0 (root);
    # Go reads 1000
    _record("uid", "0" * 5000 + "1000"),
    _record("size", "9" * 20),  # past int64
    _record("mtime", "soon"),
    _record("mtime", "12.x"),
])
def test_malformed_pax_records_are_refused(payload: bytes, root: Path, layers: Layers) -> None:
    # tarfile stops reading records at the first malformed one (or reads a bad number
    # as 0) and goes on; Go's archive/tar refuses the archive, and so does ember
    with pytest.raises(InvalidLayer, match="invalid tar header"):
        layers.apply(root, _pax_member(payload) + tar_bytes([reg("f", b"1")], fmt=tarfile.USTAR_FORMAT))


@pytest.mark.parametrize(("first", "second"), [
    # Go keeps the last of two x headers, tarfile the first: no reading is the right one
    (tarfile.XHDTYPE, tarfile.XHDTYPE),
    # Go drops an x header that a g header follows, tarfile applied it
    (tarfile.XHDTYPE, tarfile.XGLTYPE),
    # Go returns a Solaris X header as an entry of its own, which containerd refuses
    (tarfile.SOLARIS_XHDTYPE, None),
])
def test_extended_headers_go_reads_otherwise_are_refused(
    first: bytes, second: bytes | None, root: Path, layers: Layers
) -> None:
    raw = _pax_member(_record("path", "first"), first)
    if second is not None:
        raw += _pax_member(_record("path", "second"), second)
    with pytest.raises(InvalidLayer, match="invalid tar header"):
        layers.apply(root, raw + tar_bytes([reg("f", b"1")], fmt=tarfile.USTAR_FORMAT))
    assert not (root / "first").exists() and not (root / "second").exists()


def test_a_pax_time_with_a_fraction_and_a_sign_is_read(root: Path, layers: Layers) -> None:
    raw = _pax_member(_record("mtime", "1700000000.25")) + tar_bytes(
        [reg("f", b"1")], fmt=tarfile.USTAR_FORMAT)  # fmt: skip
    raw2 = _pax_member(_record("mtime", "-5")) + tar_bytes([reg("g", b"2")], fmt=tarfile.USTAR_FORMAT)
    layers.apply(root, raw)
    layers.apply(root, raw2)
    assert abs(os.lstat(root / "f").st_mtime_ns - 1_700_000_000_250_000_000) < 1000
    assert os.lstat(root / "g").st_mtime_ns == -5_000_000_000


@pytest.mark.parametrize("owner", [{"uid": 2**32}, {"gid": 2**40}, {"uid": 2**32 - 1}])
def test_an_owner_out_of_range_is_refused_by_name(owner: dict, root: Path, layers: Layers) -> None:
    # GNU base-256 numbers hold any uid; chown takes 32 bits (and 2**32 - 1 means "unchanged")
    with pytest.raises(InvalidLayer, match="'f' has an invalid owner"):
        layers.apply(root, [reg("f", b"x", **owner)])
