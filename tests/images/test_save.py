"""``ember.images.save``: the archive ``ember image save`` writes, and reading it back
(``docker-archive:``) with the image's own manifest.  The peers (podman load, skopeo)
read it in tests/cli/test_image_cli.py."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ember.images import ImageService
from ember.images.model import Image
from ember.images.save import SavedImage, archive_documents, write_archive
from ember.oci.digest import Digest
from ember.oci.reference import Reference
from tests.support.archives import rewrite_tar
from tests.support.images import layout_ref

pytestmark = pytest.mark.integration


def _save(service: ImageService, refs: list[str], names: list[str | None], path: Path) -> None:
    with service.holding(refs) as images:
        saved = [
            SavedImage(img, Reference.parse(n) if n else None)
            for img, n in zip(images, names, strict=True)
        ]
        with path.open("wb") as f:
            write_archive(saved, service.content, f)


def test_documents_name_each_image_once_with_all_its_tags(
    service: ImageService, busybox_layout: Path
) -> None:
    image = service.pull(layout_ref(busybox_layout), progress=False)
    docs = archive_documents([
        SavedImage(image, Reference.parse("bb:1")),
        SavedImage(image, Reference.parse("example.org:5000/team/bb:2")),
        SavedImage(image, Reference.parse(f"bb@{image.manifest_digest}")),  # no tag: no RepoTag
        SavedImage(image, None),
    ])  # fmt: skip
    assert json.loads(docs["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    entries = json.loads(docs["manifest.json"])
    assert entries == [{
        "Config": f"blobs/sha256/{image.config_digest.hex}",
        "RepoTags": ["bb:1", "example.org:5000/team/bb:2"],
        "Layers": [f"blobs/sha256/{x.digest.hex}" for x in image.layers],
    }]  # fmt: skip
    index = json.loads(docs["index.json"])["manifests"]
    assert [m["digest"] for m in index] == [str(image.manifest_digest)] * 4
    assert index[0]["annotations"] == {
        "io.containerd.image.name": "docker.io/library/bb:1",
        "org.opencontainers.image.ref.name": "1",
    }
    assert "annotations" not in index[3]


def test_an_image_keeps_its_id_through_save_and_pull(
    service: ImageService, busybox_layout: Path, multilayer_layout: Path, tmp_path: Path
) -> None:
    bb = service.pull(layout_ref(busybox_layout), progress=False)
    ml = service.pull(layout_ref(multilayer_layout), progress=False)
    archive = tmp_path / "two.tar"
    _save(service, [bb.reference, ml.reference], ["bb:1", "ml:2"], archive)
    other = ImageService(service.home.__class__(tmp_path / "other").ensure())
    for name, original in (("bb:1", bb), ("ml:2", ml)):
        loaded = other.pull(f"docker-archive:{archive}:{name}", progress=False)
        assert loaded.manifest_digest == original.manifest_digest
        assert loaded.config_digest == original.config_digest
        assert [x.digest for x in loaded.layers] == [x.digest for x in original.layers]


def _rewrite(src: Path, dest: Path, index: dict[str, object], extra: dict[str, bytes] | None = None) -> None:
    """``src`` with another index.json, and ``extra`` members (name: content) added."""
    rewrite_tar(src, dest, {"index.json": json.dumps(index).encode()}, extra)


def _manifest_variant(image: Image, change: Callable[[dict[str, Any]], None]) -> tuple[dict[str, object], dict[str, bytes]]:
    """An index entry and its blob for ``image``'s manifest as stored, changed by ``change``."""
    doc = json.loads(image.manifest.to_json())
    change(doc)
    data = json.dumps(doc).encode()
    digest = Digest.of(data)
    entry = {"mediaType": doc["mediaType"], "digest": str(digest), "size": len(data),
             "annotations": {"io.containerd.image.name": "docker.io/library/bb:1"}}  # fmt: skip
    return entry, {f"blobs/sha256/{digest.hex}": data}


def test_an_index_that_does_not_describe_the_image_is_passed_over(
    service: ImageService, busybox_layout: Path, multilayer_layout: Path, tmp_path: Path
) -> None:
    """A docker save archive whose index.json names no manifest of exactly this config and
    these layers (or a damaged one, or a lying one) loads as before: ember makes the
    manifest from manifest.json, and the layers are checked against the DiffIDs."""
    bb = service.pull(layout_ref(busybox_layout), progress=False)
    ml = service.pull(layout_ref(multilayer_layout), progress=False)
    archive = tmp_path / "saved.tar"
    _save(service, [bb.reference, ml.reference], ["bb:1", "ml:2"], archive)
    index = json.loads(archive_documents([SavedImage(bb, None), SavedImage(ml, None)])["index.json"])
    bb_entry, ml_entry = index["manifests"]

    def one_more_layer(doc: dict[str, Any]) -> None:
        doc["layers"].append(doc["layers"][0])

    def config_size(doc: dict[str, Any]) -> None:
        doc["config"]["size"] += 1

    def foreign(doc: dict[str, Any]) -> None:
        doc["layers"][0]["urls"] = ["https://example.org/layer"]

    def helm(doc: dict[str, Any]) -> None:
        doc["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json"

    variants = {label: _manifest_variant(bb, change) for label, change in
                (("more-layers", one_more_layer), ("config-size", config_size),
                 ("foreign", foreign), ("helm", helm))}  # fmt: skip
    cases: dict[str, tuple[list[dict[str, object]], dict[str, bytes]]] = {
        "none": ([], {}),
        # ml's manifest only: another config than bb's
        "other": ([ml_entry], {}),
        # bb's manifest with a size that is not its member's (a descriptor that lies)
        "oversized": ([{**bb_entry, "size": 4 << 20}], {}),
        "undersized": ([{**bb_entry, "size": 100}], {}),
        # a digest no member has
        "missing": ([{**bb_entry, "digest": "sha256:" + "0" * 64}], {}),
        # a member whose content is not what its name says
        "not-its-name": ([{**bb_entry, "digest": ml_entry["digest"]}], {}),
        **{label: ([entry], blobs) for label, (entry, blobs) in variants.items()},
    }
    made: Digest | None = None  # the manifest ember makes from manifest.json ("none" first)
    for label, (manifests, extra) in cases.items():
        tampered = tmp_path / f"{label}.tar"
        if label == "not-its-name":  # bb's manifest bytes under ml's manifest's name
            extra = {f"blobs/sha256/{Digest.parse(str(ml_entry['digest'])).hex}": bb.manifest.to_json()}
            manifests = [{**bb_entry, "digest": ml_entry["digest"], "size": len(extra[next(iter(extra))])}]
        _rewrite(archive, tampered, {**index, "manifests": manifests}, extra)
        home = service.home.__class__(tmp_path / f"home-{label}").ensure()
        loaded = ImageService(home).pull(f"docker-archive:{tampered}:bb:1", progress=False)
        made = made or loaded.manifest_digest
        assert loaded.manifest_digest == made != bb.manifest_digest, label  # made, not taken
        assert loaded.config_digest == bb.config_digest, label
        assert [x.digest for x in loaded.layers] == [x.digest for x in bb.layers], label


def test_the_entry_of_the_selected_name_comes_first(
    service: ImageService, busybox_layout: Path, tmp_path: Path
) -> None:
    """One image saved under two names whose manifests differ (an annotation): each name
    loads with its own manifest."""
    bb = service.pull(layout_ref(busybox_layout), progress=False)
    archive = tmp_path / "saved.tar"
    _save(service, [bb.reference], ["bb:1"], archive)
    index = json.loads(archive_documents([SavedImage(bb, Reference.parse("bb:1"))])["index.json"])

    def annotate(doc: dict[str, Any]) -> None:
        doc["annotations"] = {"org.example": "yes"}

    entry, blobs = _manifest_variant(bb, annotate)
    entry["annotations"] = {"io.containerd.image.name": "docker.io/library/ann:1"}
    tampered = tmp_path / "two-names.tar"
    # manifest.json names the image bb:1 only: give it the second name too
    _rewrite(archive, tampered, {**index, "manifests": [*index["manifests"], entry]}, blobs)
    with tarfile.open(tampered) as t:
        entries = json.loads(t.extractfile("manifest.json").read())  # type: ignore[union-attr]
    entries[0]["RepoTags"].append("ann:1")
    rewrite_tar(tampered, tampered, {"manifest.json": json.dumps(entries).encode()})
    for name, wanted in (("bb:1", bb.manifest_digest), ("ann:1", Digest.parse(str(entry["digest"])))):
        home = service.home.__class__(tmp_path / f"home-{name}").ensure()
        loaded = ImageService(home).pull(f"docker-archive:{tampered}:{name}", progress=False)
        assert loaded.manifest_digest == wanted, name
