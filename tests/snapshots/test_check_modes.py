"""snapshots.check: superblock of every layer, e2fsck -fn of the top ("top"), of all ("full"), none."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from ember.snapshots import Snapshotter
from ember.snapshots.chain import prepare_image
from ember.snapshots.errors import CheckFailed
from tests.snapshots.conftest import make_home, teardown_home
from tests.snapshots.imagekit import Entry, LayerSpec, base_layers, make_image

pytestmark = [pytest.mark.root, pytest.mark.integration]

THIRD = LayerSpec([Entry("app"), Entry("app/main", b"main\n", 0o755)])


@pytest.fixture
def full_home(tmp_path: Path) -> Iterator[Home]:
    h = make_home(tmp_path / "full-home", check="full")
    yield h
    teardown_home(h)


@pytest.fixture
def unchecked_home(tmp_path: Path) -> Iterator[Home]:
    h = make_home(tmp_path / "none-home", check="none")
    yield h
    teardown_home(h)


def _chain(home: Home, layers: list[LayerSpec], ref: str = "test/image:1") -> list[str]:
    image = make_image(home, layers, ref)
    prepare_image(home, image)
    return [str(layer.chain_id) for layer in image.layers]


def test_default_checks_the_top_fully_and_the_rest_by_superblock(home: Home) -> None:
    snap = Snapshotter(home)
    assert snap.config.check == "top"
    chain = _chain(home, [*base_layers(), THIRD])
    assert [snap.fully_checked(name) for name in chain] == [False, False, True]
    for name in chain:
        snap.check_superblock(name)  # every committed layer is clean
        subprocess.run(["e2fsck", "-fn", str(snap.path(name))], check=True, capture_output=True)


def test_full_checks_every_layer(full_home: Home) -> None:
    snap = Snapshotter(full_home)
    chain = _chain(full_home, [*base_layers(), THIRD])
    assert all(snap.fully_checked(name) for name in chain)


def test_none_records_no_check(unchecked_home: Home) -> None:
    snap = Snapshotter(unchecked_home)
    chain = _chain(unchecked_home, base_layers())
    assert not any(snap.fully_checked(name) for name in chain)


def test_an_intermediate_layer_that_becomes_a_top_is_checked_then(home: Home) -> None:
    snap = Snapshotter(home)
    long_chain = _chain(home, [*base_layers(), THIRD], "test/long:1")
    assert not snap.fully_checked(long_chain[1])
    short = make_image(home, base_layers(), "test/short:1")
    prepared = prepare_image(home, short)
    assert prepared.built == () and prepared.snapshot == long_chain[1]
    assert snap.fully_checked(long_chain[1])


def test_a_damaged_intermediate_is_refused_as_a_top(home: Home) -> None:
    snap = Snapshotter(home)
    long_chain = _chain(home, [*base_layers(), THIRD], "test/long:1")
    with open(snap.path(long_chain[1]), "r+b") as f:  # clobber the group descriptors
        f.seek(4096)
        f.write(b"\xff" * 4096)
    short = make_image(home, base_layers(), "test/short:1")
    with pytest.raises(CheckFailed, match="failed its file system check"):
        prepare_image(home, short)
    assert not snap.fully_checked(long_chain[1])


def test_a_mounted_disk_fails_the_superblock_check(home: Home) -> None:
    snap = Snapshotter(home)
    snap.prepare("k")
    with snap.mount("k"), pytest.raises(CheckFailed, match="journal needs recovery"):
        snap.check_superblock("k")
    snap.check_superblock("k")
    snap.remove("k")


def _super_options(root: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(root):
                return set(fields[-1].split(","))
    raise AssertionError(f"{root} is not mounted")


def test_only_a_builders_mount_goes_without_barriers(home: Home) -> None:
    snap = Snapshotter(home)
    _active, lock = snap.prepare_held("build/x", None)
    try:
        with snap.mount("build/x", held=lock) as root:
            assert "nobarrier" in _super_options(root)
        snap.commit("x", "build/x", held=lock)
    finally:
        lock.release()
    snap.prepare("machine", "x")
    with snap.mount("machine") as root:
        assert "nobarrier" not in _super_options(root)
    snap.remove("machine")
