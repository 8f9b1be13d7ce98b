"""A committed image is exactly what umoci unpacks from the same image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ember.home import Home
from ember.images import ImageService
from ember.snapshots import Snapshotter
from ember.snapshots.chain import prepare_image
from tests.support.treecmp import assert_same_tree, umoci_unpack

pytestmark = [pytest.mark.root, pytest.mark.integration]


def _check_against_umoci(
    home: Home, layout: Path, tmp_path: Path, reference: Path | None = None
) -> None:
    """``reference``: the layout umoci unpacks, when it is not ``layout`` itself."""
    image = ImageService(home).pull(f"oci:{layout}:latest", progress=False)
    assert len(image.layers) > 1 or "busybox" in layout.name
    prepared = prepare_image(home, image)
    assert prepared.built  # built here, not found
    subprocess.run(["e2fsck", "-fn", str(prepared.path)], check=True, capture_output=True)
    expected = umoci_unpack(reference or layout, "latest", tmp_path / "umoci")
    with Snapshotter(home).mount(prepared.snapshot) as root:
        assert_same_tree(expected, root, ignore=("lost+found",))


def test_multilayer_image_equals_umoci_unpack(
    home: Home, multilayer_layout: Path, tmp_path: Path
) -> None:
    _check_against_umoci(home, multilayer_layout, tmp_path)


def test_zstd_image_equals_umoci_unpack(
    home: Home, zstd_layout: Path, multilayer_layout: Path, tmp_path: Path
) -> None:
    # Debian's umoci cannot read zstd layers: compare with the gzip original
    _check_against_umoci(home, zstd_layout, tmp_path, reference=multilayer_layout)


def test_copy_backend_multilayer_equals_umoci_unpack(
    copy_home: Home, multilayer_layout: Path, tmp_path: Path
) -> None:
    assert Snapshotter(copy_home).pool.backend.name == "copy"
    _check_against_umoci(copy_home, multilayer_layout, tmp_path)


def test_multilayer_reuses_the_busybox_base_snapshot(
    home: Home, busybox_layout: Path, multilayer_layout: Path
) -> None:
    service = ImageService(home)
    base = service.pull(f"oci:{busybox_layout}:latest", progress=False)
    image = service.pull(f"oci:{multilayer_layout}:latest", progress=False)
    shared = [layer.chain_id for layer in base.layers]
    assert [layer.chain_id for layer in image.layers[: len(shared)]] == shared
    first = prepare_image(home, base)
    second = prepare_image(home, image)
    assert first.built == tuple(str(c) for c in shared)
    assert second.built == tuple(str(layer.chain_id) for layer in image.layers[len(shared) :])
