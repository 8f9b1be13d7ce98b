"""oci:DIR[:TAG] and docker-archive:FILE sources, imported verified."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.images import ImageNotFound, ImageService, InvalidSource
from ember.images.sources import parse_source
from ember.oci import mediatypes as mt
from ember.unpack import apply_layers
from tests.support.images import copy_layout, layout_ref
from tests.support.treecmp import assert_same_tree, umoci_unpack

pytestmark = pytest.mark.integration


def unpack(service: ImageService, ref: str, dest: Path) -> Path:
    image = service.get(ref)
    dest.mkdir()
    apply_layers(dest, [(service.layer_path(x), x.media_type, x.diff_id) for x in image.layers])
    return dest


def docker_archive(layout: Path, dest: Path, name: str = "example.org/test/app:v1") -> Path:
    subprocess.run(
        ["skopeo", "copy", "--quiet", layout_ref(layout), f"docker-archive:{dest}:{name}"],
        check=True,
        capture_output=True,
    )
    return dest


def test_oci_layout(service: ImageService, multilayer_layout: Path, tmp_path: Path) -> None:
    ref = layout_ref(multilayer_layout)
    image = service.pull(ref, progress=False)
    assert image.reference == f"oci:{multilayer_layout}:latest"
    assert service.get(ref).manifest_digest == image.manifest_digest
    assert_same_tree(
        unpack(service, ref, tmp_path / "ours"),
        umoci_unpack(multilayer_layout, "latest", tmp_path / "u"),
    )


def test_oci_layout_errors(service: ImageService, busybox_layout: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="tags: latest"):
        service.pull(f"oci:{busybox_layout}:nope", progress=False)
    with pytest.raises(InvalidSource, match="not an OCI image layout"):
        service.pull(f"oci:{tmp_path}", progress=False)
    with pytest.raises(InvalidSource):
        service.pull("oci:", progress=False)


def test_oci_layout_corrupt_blob_refused(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    layer = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.chmod(0o644)
    layer.write_bytes(bytes(data))
    with pytest.raises(InvalidSource, match="corrupt"):
        service.pull(f"oci:{layout}:latest", progress=False)
    assert service.list() == []
    assert not any(d.hex == layer.name for d in service.content.list())


def test_oci_layout_links_leading_out_of_it_are_refused(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """A blob (or index.json) that is a symlink to a file outside the layout: ember read
    any file its caller could (stored it when the digest matched, said its size and
    digest when not).  Links inside the layout, and a layout reached through a link,
    still work."""
    import hashlib

    outside = tmp_path / "secret"
    outside.write_bytes(b"not the layout's\n")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest_path = layout / "blobs" / "sha256" / manifest_digest
    manifest = json.loads(manifest_path.read_text())
    manifest["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": f"sha256:{digest}", "size": outside.stat().st_size}  # fmt: skip
    data = json.dumps(manifest).encode()
    new_digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / new_digest).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{new_digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "blobs" / "sha256" / digest).symlink_to(outside)
    with pytest.raises(InvalidSource, match=f"blob sha256:{digest} is a link that leads outside"):
        service.pull(f"oci:{layout}:latest", progress=False)
    assert not any(d.hex == digest for d in service.content.list())
    (layout / "index.json").rename(tmp_path / "index.json")
    (layout / "index.json").symlink_to(tmp_path / "index.json")
    with pytest.raises(InvalidSource, match="index.json: a link that leads outside the layout"):
        service.pull(f"oci:{layout}:latest", progress=False)
    # a layout reached through a link, with links inside it, is fine
    good = copy_layout(busybox_layout, tmp_path / "good")
    (good / "index.json").rename(good / "index.real")
    (good / "index.json").symlink_to("index.real")
    (tmp_path / "via").symlink_to(good)
    assert service.pull(f"oci:{tmp_path / 'via'}:latest", progress=False).layers


def test_oci_layout_multiarch(service: ImageService, multiarch_layout: Path) -> None:
    from ember.oci.platform import Platform

    image = service.pull(
        layout_ref(multiarch_layout), Platform.parse("linux/arm64"), progress=False
    )
    assert image.platform.architecture == "arm64"


def test_docker_archive(service: ImageService, multilayer_layout: Path, tmp_path: Path) -> None:
    archive = docker_archive(multilayer_layout, tmp_path / "image.tar")
    image = service.pull(f"docker-archive:{archive}", progress=False)
    assert image.reference == f"docker-archive:{archive}"
    assert {x.media_type for x in image.layers} == {mt.OCI_LAYER_TAR}
    assert [x.diff_id for x in image.layers] == [x.digest for x in image.layers]
    assert image.config.entrypoint == ["/bin/echo", "entrypoint"]
    # the synthesised manifest is stable: another store, the same digest
    other = ImageService(type(service.home)(tmp_path / "other-home"))
    assert (
        other.pull(f"docker-archive:{archive}", progress=False).manifest_digest
        == image.manifest_digest
    )
    ours = unpack(service, f"docker-archive:{archive}", tmp_path / "ours")
    assert_same_tree(ours, umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci"))


def test_docker_archive_selection_and_errors(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    archive = docker_archive(busybox_layout, tmp_path / "bb.tar", "example.org/bb:1")
    assert service.pull(f"docker-archive:{archive}:example.org/bb:1", progress=False).layers
    with pytest.raises(ImageNotFound):
        service.pull(f"docker-archive:{archive}:example.org/other:1", progress=False)
    assert service.pull(f"docker-archive:{archive}:@0", progress=False).layers
    # int() took these too: "-1" named the last image, and one image had many names
    for number in ("-1", "+0", "0_0", " 0", "\u0660"):
        with pytest.raises(ImageNotFound, match="has no image number"):
            service.pull(f"docker-archive:{archive}:@{number}", progress=False)
    with pytest.raises(InvalidSource, match="does not exist"):
        service.pull(f"docker-archive:{tmp_path}/missing.tar", progress=False)
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"\0junk" * 1000)
    with pytest.raises(InvalidSource):
        service.pull(f"docker-archive:{not_tar}", progress=False)


def test_docker_archive_layer_not_matching_diff_id(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """Rewrite one layer in the archive: its DiffID no longer matches, nothing is stored."""
    archive = docker_archive(busybox_layout, tmp_path / "bb.tar")
    work = tmp_path / "unpacked"
    work.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(work)], check=True)
    manifest = json.loads((work / "manifest.json").read_text())
    layer = work / manifest[0]["Layers"][0]
    data = bytearray(layer.read_bytes())
    data[600] ^= 0x01  # inside the first member's data: still a tar
    layer.write_bytes(bytes(data))
    broken = tmp_path / "broken.tar"
    subprocess.run(["tar", "-cf", str(broken), "-C", str(work), "."], check=True)
    with pytest.raises(InvalidSource, match="DiffID"):
        service.pull(f"docker-archive:{broken}", progress=False)
    assert service.list() == []
    shutil.rmtree(work)


def test_parse_source_names() -> None:
    assert parse_source("debian").name == "docker.io/library/debian:latest"
    assert parse_source("docker://debian:12").name == "docker.io/library/debian:12"
    assert parse_source("oci:/x/y:t").name == "oci:/x/y:t"
    assert parse_source("oci:/x/y").selector is None
    spec = parse_source("docker-archive:/a.tar:debian")
    assert spec.selector == "docker.io/library/debian:latest"
    assert parse_source("docker-archive:/a.tar:@1").selector == "@1"


def test_a_layout_version_must_be_a_string(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """{"imageLayoutVersion": 1.5} (a number) was read as "1.5"."""
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    for version in (1.5, ["1.0.0"], "2.0.0"):
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": version}))
        with pytest.raises(InvalidSource, match="unsupported OCI layout version"):
            service.pull(f"oci:{layout}:latest", progress=False)


def test_the_path_ends_at_the_first_colon_whatever_exists(tmp_path: Path) -> None:
    """`oci:/x/a:b` named the directory `a:b` while it existed and tag `b` of `a` after:
    two images recorded under one name (ember run then took the last one pulled)."""
    (tmp_path / "a:b").mkdir()
    spec = parse_source(f"oci:{tmp_path}/a:b")
    assert (spec.path, spec.selector) == (tmp_path / "a", "b")


def test_progress_display_on_request(
    service: ImageService, busybox_layout: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    service.pull(layout_ref(busybox_layout), progress=True)
    err = capfd.readouterr().err
    assert "layer 1/1" in err and "total" in err
    service.remove(layout_ref(busybox_layout))
    service.pull(layout_ref(busybox_layout), progress=None)  # not a terminal: silent
    assert capfd.readouterr().err == ""


def test_docker_save_archive(
    service: ImageService, busybox_docker_archive: Path, busybox_layout: Path, tmp_path: Path
) -> None:
    image = service.pull(f"docker-archive:{busybox_docker_archive}", progress=False)
    assert len(image.layers) == 1
    ours = unpack(service, f"docker-archive:{busybox_docker_archive}", tmp_path / "ours")
    assert_same_tree(ours, umoci_unpack(busybox_layout, "latest", tmp_path / "umoci"))


def _rewrite_archive(src: Path, dest: Path, layer_alias: str, link_target: str) -> None:
    """Copy a docker archive, pointing its first layer at a symlink ``layer_alias -> link_target``."""
    import io
    import tarfile

    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name.lstrip("./") == "manifest.json" and data is not None:
                doc = json.loads(data)
                doc[0]["Layers"][0] = layer_alias
                data = json.dumps(doc).encode()
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data) if data is not None else None)
        link = tarfile.TarInfo(layer_alias)
        link.type = tarfile.SYMTYPE
        link.linkname = link_target
        tout.addfile(link)


def test_docker_archive_symlinked_layers_stay_inside(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    archive = docker_archive(busybox_layout, tmp_path / "bb.tar")
    import tarfile

    with tarfile.open(archive) as t:
        layer_name = json.loads(t.extractfile("manifest.json").read())[0]["Layers"][0]  # type: ignore[union-attr]
    good = tmp_path / "good.tar"
    _rewrite_archive(archive, good, "alias/layer.tar", f"../{layer_name}")
    assert service.pull(f"docker-archive:{good}", progress=False).layers
    evil = tmp_path / "evil.tar"
    _rewrite_archive(archive, evil, "alias/layer.tar", "../../../../etc/passwd")
    with pytest.raises(InvalidSource, match="'alias/layer.tar' is a link that leads out of the archive"):
        service.pull(f"docker-archive:{evil}", progress=False)
