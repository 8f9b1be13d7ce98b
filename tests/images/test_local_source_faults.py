"""Hostile or broken ``oci:`` layouts and ``docker-archive:`` files: a clear
InvalidSource every time, never a traceback, a hang or unbounded memory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.images import ImageService, InvalidSource
from ember.images.ocilayout import OciLayoutSource
from tests.support.images import copy_layout

pytestmark = pytest.mark.integration

NOBODY = 65534


def _blobs(layout: Path) -> tuple[Path, Path]:
    """(manifest blob, first layer blob) of a single-image layout."""
    index = json.loads((layout / "index.json").read_text())
    manifest = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    layer_digest = json.loads(manifest.read_text())["layers"][0]["digest"]
    return manifest, layout / "blobs" / "sha256" / layer_digest.split(":")[1]


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


def finishes(call: Callable[[], object], fifos: list[Path], seconds: float = 10) -> BaseException:
    """Run ``call`` (which must raise) in a thread; if it blocks on a FIFO, unblock it and fail."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:  # a writer that goes away: the reader sees EOF and returns
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"blocked on a FIFO ({fifos})")
    assert outcome, "no error raised"
    return outcome[0]


# --------------------------------------------------------------------------- oci:


def test_oci_blobs_not_a_directory(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    shutil.rmtree(layout / "blobs")
    (layout / "blobs").write_bytes(b"not a directory")
    with pytest.raises(InvalidSource, match="lacks blob"):
        service.pull(f"oci:{layout}:latest", progress=False)


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"schemaVersion": 2, "manifests": {}}', b"[]"]
)
def test_oci_broken_index_json_is_named(
    service: ImageService, busybox_layout: Path, tmp_path: Path, content: bytes
) -> None:
    """"manifest is not valid JSON" said nothing of which file of the layout."""
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    (layout / "index.json").write_bytes(content)
    with pytest.raises(InvalidSource, match=f"^{layout / 'index.json'}: "):
        service.pull(f"oci:{layout}:latest", progress=False)


@pytest.mark.parametrize("which", ["manifest", "layer"])
def test_oci_blob_that_is_a_directory(
    service: ImageService, busybox_layout: Path, tmp_path: Path, which: str
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    manifest, layer = _blobs(layout)
    _replace(manifest if which == "manifest" else layer, Path.mkdir)
    with pytest.raises(InvalidSource, match="not a regular file"):
        service.pull(f"oci:{layout}:latest", progress=False)
    assert service.list() == []


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Act as nobody (root reads mode-000 files regardless); a no-op for other users."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture()
def open_dir() -> Iterator[Path]:
    """A directory nobody can traverse (pytest's tmp_path is private to its user)."""
    path = Path(tempfile.mkdtemp(prefix="ember-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("which", ["manifest", "layer"])
def test_oci_unreadable_blob(
    busybox_layout: Path, open_dir: Path, tmp_path: Path, which: str
) -> None:
    from ember.oci.digest import Digest
    from ember.oci.manifest import Descriptor
    from ember.store.content import ContentStore

    layout = copy_layout(busybox_layout, open_dir / "layout")
    for p in [layout, *layout.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    manifest, layer = _blobs(layout)
    blob = manifest if which == "manifest" else layer
    blob.chmod(0)
    source = OciLayoutSource(layout, "latest", "test")
    if which == "manifest":
        with unprivileged(), pytest.raises(InvalidSource, match="cannot read blob"):
            source.resolve(None)
        return
    resolved = source.resolve(None)
    layer_desc = next(
        d for d in json.loads(resolved.data)["layers"] if d["digest"].endswith(layer.name)
    )
    desc = Descriptor(
        layer_desc["mediaType"], Digest.parse(layer_desc["digest"]), layer_desc["size"]
    )
    # world-readable, so that nobody can look in it: the blob is refused before any write
    store = ContentStore(open_dir / "store")
    with unprivileged(), pytest.raises(InvalidSource, match="cannot read blob"):
        source.fetch(desc, store, None)


@pytest.mark.parametrize("which", ["oci-layout", "index.json", "manifest", "layer"])
def test_oci_fifo_does_not_block(
    service: ImageService, busybox_layout: Path, tmp_path: Path, which: str
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    manifest, layer = _blobs(layout)
    target = {"oci-layout": layout / "oci-layout", "index.json": layout / "index.json",
              "manifest": manifest, "layer": layer}[which]  # fmt: skip
    _replace(target, os.mkfifo)
    error = finishes(lambda: service.pull(f"oci:{layout}:latest", progress=False), [target])
    assert isinstance(error, InvalidSource), repr(error)
    assert "not a regular file" in str(error)


def test_oci_layout_file_is_capped(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    # valid JSON, padded: read whole, it would be accepted
    (layout / "oci-layout").write_bytes(b'{"imageLayoutVersion": "1.0.0"}' + b" " * (8 << 20))
    with pytest.raises(InvalidSource, match="larger than"):
        service.pull(f"oci:{layout}:latest", progress=False)


def test_oci_layout_file_is_a_device(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    _replace(layout / "oci-layout", lambda p: p.symlink_to("/dev/zero"))
    with pytest.raises(InvalidSource, match="not a regular file"):
        service.pull(f"oci:{layout}:latest", progress=False)


# --------------------------------------------------------------------------- docker-archive:


def test_docker_archive_truncated(
    service: ImageService, busybox_docker_archive: Path, tmp_path: Path
) -> None:
    data = busybox_docker_archive.read_bytes()
    with tarfile.open(busybox_docker_archive) as tar:
        manifest = tar.getmember("manifest.json")
    # in the middle of the layer; inside manifest.json (the end of the walk)
    for size in (len(data) // 2, manifest.offset_data + manifest.size // 2):
        cut = tmp_path / f"cut-{size}.tar"
        cut.write_bytes(data[:size])
        with pytest.raises(InvalidSource, match="truncated|not a docker archive|lacks"):
            service.pull(f"docker-archive:{cut}", progress=False)
    assert service.list() == []


def test_docker_archive_fifo_does_not_block(service: ImageService, tmp_path: Path) -> None:
    fifo = tmp_path / "image.tar"
    os.mkfifo(fifo)
    error = finishes(lambda: service.pull(f"docker-archive:{fifo}", progress=False), [fifo])
    assert isinstance(error, InvalidSource), repr(error)
    assert "not a regular file" in str(error)


def test_docker_archive_directory(service: ImageService, tmp_path: Path) -> None:
    with pytest.raises(InvalidSource, match="not a regular file"):
        service.pull(f"docker-archive:{tmp_path}", progress=False)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("../../etc/passwd", "is a link that leads out of the archive"),
        ("elsewhere/layer.tar", "(a link to 'elsewhere/layer.tar', which is not there)"),
    ],
)
def test_docker_archive_layer_link_that_goes_nowhere_is_named(
    service: ImageService, busybox_docker_archive: Path, tmp_path: Path, target: str, message: str
) -> None:
    """A layer that is a symlink out of the archive was reported as missing."""
    with tarfile.open(busybox_docker_archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        layer = manifest[0]["Layers"][0]
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as out:
            for member in tar.getmembers():
                if member.name == layer:
                    link = tarfile.TarInfo(layer)
                    link.type, link.linkname = tarfile.SYMTYPE, target
                    out.addfile(link)
                else:
                    out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    with pytest.raises(InvalidSource) as e:
        service.pull(f"docker-archive:{bad}", progress=False)
    assert repr(layer) in str(e.value) and message in str(e.value)
    assert service.list() == []


def test_an_oci_layout_file_nested_too_deep_is_named(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """'[' * 5000 in oci-layout was a RecursionError traceback."""
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    (layout / "oci-layout").write_bytes(b"[" * 5000)
    with pytest.raises(InvalidSource, match="oci-layout: not JSON .*nested too deeply"):
        service.pull(f"oci:{layout}:latest", progress=False)


def test_a_docker_archive_manifest_nested_too_deep_is_named(
    service: ImageService, busybox_docker_archive: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "deep.tar"
    with tarfile.open(busybox_docker_archive) as tar, tarfile.open(bad, "w") as out:
        for member in tar.getmembers():
            if member.name == "manifest.json":
                data = b"[" * 5000
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
            else:
                out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    with pytest.raises(InvalidSource, match="manifest.json is not JSON"):
        service.pull(f"docker-archive:{bad}", progress=False)
