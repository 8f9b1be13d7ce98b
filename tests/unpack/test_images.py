"""Integration: ember's flattened root equals ``umoci unpack`` of the same image.

The OCI layouts come from the shared fixtures (built with debootstrap, buildah,
skopeo); they are read directly (index.json -> manifest -> config) so this test
depends on nothing but ember.unpack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.oci.digest import Digest
from ember.unpack import apply_layers
from tests.support.treecmp import assert_same_tree, umoci_unpack

pytestmark = pytest.mark.integration


def _blob(layout: Path, digest: str) -> Path:
    d = Digest.parse(digest)
    return layout / "blobs" / d.algorithm / d.hex


def layout_layers(layout: Path) -> list[tuple[Path, str, Digest | None]]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_text())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"])
    return [
        (_blob(layout, layer["digest"]), layer["mediaType"], Digest.parse(diff_id))
        for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    ]


def _compare(tmp_path: Path, layout: Path, reference: Path) -> None:
    """``layout`` applied by ember equals ``reference``, a tree umoci unpacked."""
    root = tmp_path / "ember"
    root.mkdir()
    stats = apply_layers(root, layout_layers(layout))
    assert stats.layers == len(layout_layers(layout))
    assert_same_tree(root, reference)


def test_multilayer_image_matches_umoci(tmp_path: Path, multilayer_layout: Path) -> None:
    _compare(tmp_path, multilayer_layout, umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci"))
    data = tmp_path / "ember" / "data"
    # the cross-layer cases the image was built for, checked by name as well
    assert (data / "hardlink-src").read_text() == "original\n"
    assert (data / "hardlink-dst").read_text() == "changed\n"
    assert not (data / "gone").exists() and not (data / "dir").exists()
    assert sorted(p.name for p in (data / "opaque").iterdir()) == ["new"]


def test_zstd_image_matches_umoci(tmp_path: Path, zstd_layout: Path, multilayer_layout: Path) -> None:
    # umoci cannot unpack zstd: the gzip twin (same DiffIDs) is the reference
    assert [d for _, _, d in layout_layers(zstd_layout)] == [d for _, _, d in layout_layers(multilayer_layout)]
    _compare(tmp_path, zstd_layout, umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci"))


def test_debian_image_matches_umoci(tmp_path: Path, debian_layout: Path, debian_rootfs: Path) -> None:
    _compare(tmp_path, debian_layout, debian_rootfs)
