"""Local sources under hostile input: tar headers that Python's tarfile cannot survive,
blobs that are not what their descriptors say (holes of gigabytes on disk cost nothing to
make), and size claims on blobs the store already has."""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from ember.home import Home
from ember.images import ImageService, InvalidSource
from ember.images.dockerarchive import DockerArchiveSource
from ember.images.ocilayout import OciLayoutSource
from ember.oci.digest import Digest
from ember.oci.manifest import Descriptor, ImageManifest, parse_manifest
from ember.store.content import ContentStore
from ember.unpack import compression
from tests.support.images import copy_layout

pytestmark = pytest.mark.integration

EMBER = str(Path(sys.executable).with_name("ember"))
#: address space for an ``ember image pull`` child: far above what a pull of these small
#: images needs, far below what reading a 4 GiB extended header whole takes
PULL_ADDRESS_SPACE = 3 << 30


# --------------------------------------------------------------------------- helpers


def _json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _layout_manifest(layout: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = _json(_blob(layout, _json(layout / "index.json")["manifests"][0]["digest"]))
    return manifest


def _layer_descriptor(layout: Path) -> Descriptor:
    layer = _layout_manifest(layout)["layers"][0]
    return Descriptor(layer["mediaType"], Digest.parse(layer["digest"]), layer["size"])


def _write_tar(path: Path, members: list[tuple[str, bytes, int]], prefix: bytes = b"") -> None:
    """A tar of regular files ``(name, first bytes, size)``: what follows the first bytes
    of a member up to its size is a hole (costs no disk), as a ``truncate`` makes."""
    with open(path, "wb") as f:
        f.write(prefix)
        for name, head, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            f.write(info.tobuf(tarfile.GNU_FORMAT))
            f.write(head)
            f.seek(size - len(head) + (-size % tarfile.BLOCKSIZE), os.SEEK_CUR)
        f.write(b"\0" * 2 * tarfile.BLOCKSIZE)


def _busybox_archive(layout: Path, path: Path, layer: bytes | tuple[bytes, int], prefix: bytes = b"") -> Path:
    """A ``docker save``-shaped archive of the busybox image with ``layer`` as its layer
    member (bytes, or first bytes and a size: a hole after them)."""
    manifest = _layout_manifest(layout)
    config = _blob(layout, manifest["config"]["digest"]).read_bytes()
    head, size = (layer, len(layer)) if isinstance(layer, bytes) else layer
    entry = [{"Config": "config.json", "RepoTags": ["example.org/bb:1"], "Layers": ["layer.tar"]}]
    _write_tar(
        path,
        [
            ("manifest.json", json.dumps(entry).encode(), len(json.dumps(entry))),
            ("config.json", config, len(config)),
            ("layer.tar", head, size),
        ],
        prefix,
    )
    return path


def _uncompressed_layer(layout: Path) -> bytes:
    return gzip.decompress(_blob(layout, str(_layer_descriptor(layout).digest)).read_bytes())


def _nothing_stored(store: ContentStore, but: Digest | None = None) -> None:
    """No blob in ``store`` (``but`` this one: a config, fetched beside the layers) and no
    partial file."""
    assert [d for d in store.list() if d != but] == []
    assert list(store.ingest_dir.iterdir()) == []


# --------------------------------------------------------------------------- 1. tar headers


def _checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _base256(value: int) -> bytes:
    field = bytearray((value & ((1 << 96) - 1)).to_bytes(12, "big"))
    field[0] |= 0x80
    return bytes(field)


def _header(name: str, type_: bytes, size: int) -> bytes:
    """A GNU header whose size may be anything base-256 holds, negative too."""
    info = tarfile.TarInfo(name)
    info.type = type_
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[124:136] = _base256(size)
    return _checksum(block)


def _negative_size() -> bytes:
    # CVE-2025-8194: tarfile goes back to the same header for ever, its memory growing
    return tarfile.TarInfo("").tobuf(tarfile.GNU_FORMAT) + _header("x", tarfile.REGTYPE, -512)


def _pax_digits() -> bytes:
    # CVE-2024-6232: tarfile's hdrcharset regex is quadratic in a run of digits (24 s here)
    payload = b"1" * 180_000
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(payload)
    padding = b"\0" * (-len(payload) % tarfile.BLOCKSIZE)
    return header.tobuf(tarfile.USTAR_FORMAT) + payload + padding + tarfile.TarInfo("p").tobuf()


def _huge_long_name() -> bytes:
    # a GNU long name of 2**62 bytes: tarfile reads it whole (MemoryError traceback)
    return _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 1 << 62) + b"\0" * 4096


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (PULL_ADDRESS_SPACE, PULL_ADDRESS_SPACE))


def _pull(archive: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_HOME": str(home), "DOCKER_CONFIG": str(home / "no-docker")}
    return subprocess.run(
        [EMBER, "image", "pull", "-q", f"docker-archive:{archive}"],
        env=env, capture_output=True, text=True, timeout=20, preexec_fn=_limited,  # noqa: PLW1509
    )  # fmt: skip


def test_a_docker_archive_pulls_within_the_memory_limit_the_hostile_ones_get(
    busybox_docker_archive: Path, tmp_path: Path
) -> None:
    """The limit of the test below is no reason for a failure."""
    done = _pull(busybox_docker_archive, tmp_path / "home")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("hostile", "message"),
    [
        ("negative-size", "is truncated or damaged (tar entry 'x' has an invalid size (-512))"),
        ("pax-digits", "invalid tar header at offset 0: malformed pax record"),
        ("huge-long-name", "tar header at offset 512 is too large (4611686018427387904 bytes)"),
        ("huge-pax-hole", "tar header at offset 512 is too large (4294967296 bytes)"),
    ],
)
def test_tar_headers_that_break_tarfile_are_refused_at_once(
    busybox_docker_archive: Path, tmp_path: Path, hostile: str, message: str
) -> None:
    """Each hung ember, filled its memory or ended in a traceback (tarfile indexed the
    archive); before a valid ``docker save`` archive, to leave no other reason to fail."""
    archive = tmp_path / "hostile.tar"
    if hostile == "huge-pax-hole":  # a hole on disk: tarfile read it whole into memory
        with open(archive, "wb") as f:
            f.write(_header("././@PaxHeader", tarfile.XHDTYPE, 4 << 30))
            f.seek(4 << 30, os.SEEK_CUR)
            f.write(busybox_docker_archive.read_bytes())
    else:
        prefix = {"negative-size": _negative_size, "pax-digits": _pax_digits,
                  "huge-long-name": _huge_long_name}[hostile]()  # fmt: skip
        archive.write_bytes(prefix + busybox_docker_archive.read_bytes())
    start = time.monotonic()
    try:
        done = _pull(archive, tmp_path / "home")
    except subprocess.TimeoutExpired:
        pytest.fail("ember image pull hung")
    assert time.monotonic() - start < 10
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(archive) in done.stderr and message in done.stderr, done.stderr
    assert ImageService(Home(tmp_path / "home")).list() == []


def _bytes_read() -> int:
    """What this process has read through read(2) and its kin so far (holes included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_indexing_skips_member_data(busybox_layout: Path, tmp_path: Path) -> None:
    """Headers only: an archive with a 64 GiB member (a hole) is indexed without
    reading it."""
    archive = _busybox_archive(busybox_layout, tmp_path / "big.tar", (b"", 64 << 30))
    before = _bytes_read()
    start = time.monotonic()
    DockerArchiveSource(archive, None, "test").close()
    read = _bytes_read() - before
    assert read < 16 << 20, f"{read} bytes read to index it"  # 64 GiB if it read the hole
    assert time.monotonic() - start < 60  # did not hang


def test_an_empty_file_is_not_a_docker_archive(service: ImageService, tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(InvalidSource, match="is not a docker archive"):
        service.pull(f"docker-archive:{empty}", progress=False)


# --------------------------------------------------------------------------- 2. blobs copied


def test_an_oci_blob_that_does_not_match_writes_nothing(
    busybox_layout: Path, tmp_path: Path
) -> None:
    """A hole of the declared size under a wrong digest was copied whole into ingest/
    (4 GiB in 23 s) before the digest was found wrong."""
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    desc = _layer_descriptor(layout)
    blob = _blob(layout, str(desc.digest))
    blob.unlink()
    os.truncate(os.open(blob, os.O_CREAT | os.O_WRONLY, 0o644), desc.size)
    store = ContentStore(tmp_path / "store")
    written: list[int] = []
    with pytest.raises(InvalidSource, match="holds a corrupt blob"):
        OciLayoutSource(layout, "latest", "test").fetch(desc, store, written.append)
    assert written == []  # refused before a byte reached the store
    _nothing_stored(store)


def test_a_docker_archive_layer_that_does_not_match_writes_nothing(
    busybox_layout: Path, tmp_path: Path
) -> None:
    """An uncompressed member (a 256 MiB hole) under a layer's DiffID: copied whole first."""
    archive = _busybox_archive(busybox_layout, tmp_path / "hole.tar", (b"", 256 << 20))
    source = DockerArchiveSource(archive, None, "test")
    try:
        manifest = parse_manifest(source.resolve(None).data)
        assert isinstance(manifest, ImageManifest)
        layer = manifest.layers[0]
        store = ContentStore(tmp_path / "store")
        written: list[int] = []
        with pytest.raises(InvalidSource, match="does not match the DiffID its config declares"):
            source.fetch(layer, store, written.append)
    finally:
        source.close()
    assert written == []
    _nothing_stored(store)


@pytest.fixture()
def small_fs(tmp_path: Path) -> Any:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_an_image_of_too_many_layers_is_refused_before_any_download(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    from ember.images import InvalidImage
    from ember.images.service import MAX_LAYERS

    layout = copy_layout(busybox_layout, tmp_path / "layout")
    manifest = _layout_manifest(layout)
    config = _json(_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"] *= MAX_LAYERS + 1
    config_data = json.dumps(config).encode()
    manifest["config"].update(digest=str(Digest.of(config_data)), size=len(config_data))
    manifest["layers"] *= MAX_LAYERS + 1
    manifest_data = json.dumps(manifest).encode()
    for data in (config_data, manifest_data):
        _blob(layout, str(Digest.of(data))).write_bytes(data)
    index = _json(layout / "index.json")
    index["manifests"][0].update(digest=str(Digest.of(manifest_data)), size=len(manifest_data))
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidImage, match=f"{MAX_LAYERS + 1} layers"):
        service.pull(f"oci:{layout}:latest", progress=False)
    _nothing_stored(service.content)


def test_a_local_blob_larger_than_the_free_space_is_refused_before_copying(
    busybox_layout: Path, small_fs: Path
) -> None:
    """It filled the file system, then kept the partial file "for a later pull to resume",
    which a local source never does (the file system stayed full until ember gc)."""
    desc = _layer_descriptor(busybox_layout)  # 1 MiB: more than the file system holds
    store = ContentStore(small_fs / "content")
    written: list[int] = []
    with pytest.raises(Exception, match=f"no space for blob {desc.digest}") as e:
        OciLayoutSource(busybox_layout, "latest", "test").fetch(desc, store, written.append)
    assert "resume" not in str(e.value)
    assert written == []
    _nothing_stored(store)


def test_a_compressed_member_is_checked_against_its_diff_id(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """A gzip member's digest is computed from the member itself, so it always matched:
    gzip magic and a 2 GiB hole were stored for good as a 2.1 GB image."""
    archive = _busybox_archive(busybox_layout, tmp_path / "magic.tar", (b"\x1f\x8b", 64 << 20))
    with pytest.raises(InvalidSource, match="layer 'layer.tar' is not valid gzip data"):
        service.pull(f"docker-archive:{archive}", progress=False)
    # valid gzip, of another tar than the config's DiffID names
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("empty"))
    archive = _busybox_archive(busybox_layout, tmp_path / "other.tar", gzip.compress(other.getvalue()))
    with pytest.raises(InvalidSource, match="layer 'layer.tar' does not decompress to the DiffID"):
        service.pull(f"docker-archive:{archive}", progress=False)
    assert service.list() == []
    _nothing_stored(service.content, Digest.parse(_layout_manifest(busybox_layout)["config"]["digest"]))


def test_a_compressed_member_that_matches_is_pulled(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    layer = _blob(busybox_layout, str(_layer_descriptor(busybox_layout).digest)).read_bytes()
    archive = _busybox_archive(busybox_layout, tmp_path / "gzip.tar", layer)
    image = service.pull(f"docker-archive:{archive}", progress=False)
    assert [(la.media_type, la.digest) for la in image.layers] == [
        ("application/vnd.oci.image.layer.v1.tar+gzip", _layer_descriptor(busybox_layout).digest)
    ]


def test_a_compressed_member_that_expands_past_the_budget_is_refused(
    service: ImageService, busybox_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its DiffID check inflated and hashed it whole, unbounded: zstd packs zeros ~32000:1,
    so a 32 KB member was a GiB of work, a 100 MB one ~3 TB.  The unpacker's budget
    applies (made small here: 16 MiB of zeros in a few hundred bytes is over it)."""
    monkeypatch.setattr(compression, "EXPANSION_LIMIT", compression.ExpansionLimit(128, 4 << 20))
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 16 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    member = zstandard.ZstdCompressor().compress(bomb.getvalue())
    archive = _busybox_archive(busybox_layout, tmp_path / "bomb.tar", member)
    with pytest.raises(InvalidSource) as e:
        service.pull(f"docker-archive:{archive}", progress=False)
    assert str(e.value) == (
        f"docker archive {archive}: layer {Digest.of(member)} ('layer.tar' in the archive) expands "
        f"to more than {4 << 20} bytes (compressed {len(member)}): refused as a decompression bomb "
        f"(a layer may expand to 128 times its compressed size, and to {4 << 20} bytes whatever its size)"
    )
    assert service.list() == []
    _nothing_stored(service.content, Digest.parse(_layout_manifest(busybox_layout)["config"]["digest"]))


def test_a_truncated_zstd_member_is_refused(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """Cut in its checksum, it decompressed to the whole layer, matched its DiffID and was
    stored: zstandard's reader takes a cut frame for the end of the data."""
    member = zstandard.ZstdCompressor(write_checksum=True).compress(_uncompressed_layer(busybox_layout))
    archive = _busybox_archive(busybox_layout, tmp_path / "cut.tar", member[:-2])
    with pytest.raises(
        InvalidSource, match="layer 'layer.tar' is not valid zstd data \\(zstd data ends in the middle of a frame"
    ):
        service.pull(f"docker-archive:{archive}", progress=False)
    assert service.list() == []


def _repeated_layer_archive(layout: Path, path: Path, times: int) -> Path:
    """The busybox image's gzip layer named ``times`` over in manifest.json (and its
    DiffID as often in the config): one member, ``times`` layers."""
    manifest = _layout_manifest(layout)
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"] * times
    config_data = json.dumps(config).encode()
    layer = _blob(layout, str(_layer_descriptor(layout).digest)).read_bytes()
    entry = json.dumps([{"Config": "config.json", "Layers": ["layer.tar"] * times}]).encode()
    _write_tar(path, [("manifest.json", entry, len(entry)), ("config.json", config_data, len(config_data)),
                      ("layer.tar", layer, len(layer))])  # fmt: skip
    return path


def test_a_member_named_many_times_is_hashed_once(
    service: ImageService, busybox_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each name of a compressed member in manifest.json hashed it whole again: 10,000
    names of one 100 MB member were 13 minutes of hashing before any limit applied."""
    archive = _repeated_layer_archive(busybox_layout, tmp_path / "repeated.tar", 50)
    passes = []
    real_chunks = DockerArchiveSource._chunks

    def counting(self: DockerArchiveSource, member: tarfile.TarInfo, limit: int | None = None,
                 **kwargs: Any) -> Any:  # fmt: skip
        if limit is None:  # a read of the whole member
            passes.append(member.name)
        return real_chunks(self, member, limit, **kwargs)

    monkeypatch.setattr(DockerArchiveSource, "_chunks", counting)
    image = service.pull(f"docker-archive:{archive}", progress=False)
    assert len(image.layers) == 50
    assert passes.count("layer.tar") <= 3  # hashed once; fetched once (its DiffID checked, then copied)
    too_many = _repeated_layer_archive(busybox_layout, tmp_path / "too-many.tar", 10_001)
    passes.clear()
    with pytest.raises(InvalidSource, match="10001 layers, more than the 10000 ember accepts"):
        service.pull(f"docker-archive:{too_many}", progress=False)
    assert "layer.tar" not in passes  # refused before any layer was read


# --------------------------------------------------------------------------- 3. stored blobs# --------------------------------------------------------------------------- 3. stored blobs


def test_an_oci_size_claim_on_a_stored_blob_is_checked(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """A manifest claimed 4 GiB for a layer the store had: pulled, and listed as 4 GiB."""
    service.pull(f"oci:{busybox_layout}:latest", progress=False)
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    manifest = _layout_manifest(layout)
    manifest["layers"][0]["size"] = 4 << 30
    data = json.dumps(manifest).encode()
    digest = Digest.of(data)
    _blob(layout, str(digest)).write_bytes(data)
    index = _json(layout / "index.json")
    index["manifests"][0].update(digest=str(digest), size=len(data))
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "claim"
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidSource, match=r"is 1088149 bytes, its descriptor declares 4294967296"):
        service.pull(f"oci:{layout}:claim", progress=False)
    assert [i.reference for i in service.list()] == [f"oci:{busybox_layout}:latest"]


def test_a_docker_archive_size_claim_on_a_stored_layer_is_checked(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """A member of another size under a DiffID the store has: its size was believed."""
    layer = _uncompressed_layer(busybox_layout)
    good = _busybox_archive(busybox_layout, tmp_path / "good.tar", layer)
    service.pull(f"docker-archive:{good}", progress=False)
    padded = _busybox_archive(busybox_layout, tmp_path / "padded.tar", (layer, len(layer) + (1 << 30)))
    with pytest.raises(InvalidSource, match=f"is {len(layer)} bytes, its descriptor declares"):
        service.pull(f"docker-archive:{padded}", progress=False)
    assert [i.reference for i in service.list()] == [f"docker-archive:{good}"]


def test_a_good_local_blob_is_copied_with_its_progress_counted_once(
    busybox_layout: Path, tmp_path: Path
) -> None:
    """The blob is read twice (checked in place, then copied): its bytes are counted once."""
    desc = _layer_descriptor(busybox_layout)
    store = ContentStore(tmp_path / "store")
    written: list[int] = []
    OciLayoutSource(busybox_layout, "latest", "test").fetch(desc, store, written.append)
    assert sum(written) == desc.size and store.size(desc.digest) == desc.size
    assert list(store.ingest_dir.iterdir()) == []
