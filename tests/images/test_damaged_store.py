"""Blobs of the content store damaged on disk after they were verified and named (a torn
write, a truncated file, a flipped bit): a pull that needs one replaces it, whichever
image it pulls, rather than blame its source for the store's damage forever."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.images import ImageService
from ember.images.errors import InvalidSource
from ember.oci.digest import Digest
from ember.registry.client.errors import RegistryError
from tests.support.images import copy_layout, layout_ref, push_layout
from tests.support.registry import Registry


def _truncate(service: ImageService, digest: Digest) -> None:
    """What a torn write or a lost write-back leaves: the blob's tail is gone."""
    path = service.content.path(digest)
    path.chmod(0o644)
    os.truncate(path, path.stat().st_size // 2)


def _flip_a_byte(service: ImageService, digest: Digest) -> None:
    """Damage that keeps the size: only hashing the blob tells."""
    path = service.content.path(digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_truncated_layer_is_fetched_again_by_a_pull_of_any_image_sharing_it(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    """Every later pull of an image sharing the layer failed ("... describes blob X as N
    bytes; it is M"), ember gc kept the blob (a recorded image names it), and a re-pull
    of the image itself failed the same way."""
    first = push_layout(busybox_layout, registry, f"{__name__}/first")
    second = push_layout(busybox_layout, registry, f"{__name__}/second")
    layer = service.pull(first, progress=False).layers[0]
    _truncate(service, layer.digest)

    image = service.pull(second, progress=False)
    assert image.layers[0].digest == layer.digest
    assert service.content.matches(layer.digest)
    _truncate(service, layer.digest)
    service.pull(first, progress=False)
    assert service.content.matches(layer.digest)


def test_a_truncated_layer_is_copied_again_from_a_local_source(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """The (intact) layout was blamed: "blob X is M bytes, its descriptor declares N"."""
    other = copy_layout(busybox_layout, tmp_path / "other")
    layer = service.pull(layout_ref(busybox_layout), progress=False).layers[0]
    _truncate(service, layer.digest)
    service.pull(layout_ref(other), progress=False)
    assert service.content.matches(layer.digest)


def test_an_intact_stored_layer_still_refuses_a_lying_descriptor(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """The repair does not hide a source that is wrong: the stored copy is hashed, found
    intact, and kept; the source is refused, saying the stored copy matches."""
    import json

    layout = copy_layout(busybox_layout, tmp_path / "layout")
    layer = service.pull(layout_ref(layout), progress=False).layers[0]
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    manifest["layers"][0]["size"] = layer.size + 1
    data = json.dumps(manifest).encode()
    digest = Digest.of(data)
    (layout / "blobs" / "sha256" / digest.hex).write_bytes(data)
    index["manifests"][0].update(digest=str(digest), size=len(data))
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "lying"
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidSource, match="the copy in the local store matches its digest"):
        service.pull(f"oci:{layout}:lying", progress=False)
    assert service.content.matches(layer.digest)


def test_a_damaged_manifest_is_replaced_not_recorded(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    """The pull of another name said it succeeded over the damaged manifest (the store
    "had" it), and the very next command said the image was damaged."""
    first = push_layout(busybox_layout, registry, f"{__name__}/mfirst")
    second = push_layout(busybox_layout, registry, f"{__name__}/msecond")
    image = service.pull(first, progress=False)
    path = service.content.path(image.manifest_digest)
    path.chmod(0o644)
    path.write_bytes(b"{}")
    service.pull(second, progress=False)
    assert service.get(second).manifest_digest == image.manifest_digest
    assert service.content.matches(image.manifest_digest)


def test_a_damaged_config_of_the_same_size_is_fetched_again(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    """A stored config was read unverified by the pull: the damaged bytes were parsed
    as the image's config (or failed as invalid JSON, blaming the image)."""
    first = push_layout(busybox_layout, registry, f"{__name__}/cfirst")
    second = push_layout(busybox_layout, registry, f"{__name__}/csecond")
    image = service.pull(first, progress=False)
    _flip_a_byte(service, image.config_digest)
    pulled = service.pull(second, progress=False)
    assert pulled.config == image.config
    assert service.content.matches(image.config_digest)


def test_using_a_local_image_with_a_truncated_layer_fetches_it_again(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    """``ensure`` (image unpack, prepare, run) handed out the local image whose layer was
    torn: applying it then failed once before the blob was removed."""
    ref = push_layout(busybox_layout, registry, f"{__name__}/ensure")
    layer = service.pull(ref, progress=False).layers[0]
    _truncate(service, layer.digest)
    service.ensure(ref)
    assert service.content.matches(layer.digest)


def test_the_registry_is_still_blamed_when_the_stored_copy_is_intact(
    service: ImageService, registry: Registry, busybox_layout: Path
) -> None:
    """What the registry says is checked against an intact stored copy as before."""
    from ember.oci import mediatypes as mt
    from ember.oci.manifest import Descriptor
    from ember.registry.client.client import RegistryClient

    ref = push_layout(busybox_layout, registry, f"{__name__}/intact")
    layer = service.pull(ref, progress=False).layers[0]
    lying = Descriptor(mt.OCI_LAYER_GZIP, layer.digest, layer.size + 1)
    with (
        RegistryClient(registry.host, plain_http=True, retries=0) as client,
        pytest.raises(RegistryError, match="describes blob .* it is .*matches its digest"),
    ):
        client.fetch_blob(f"{__name__}/intact", lying, service.content)
    assert service.content.matches(layer.digest)
