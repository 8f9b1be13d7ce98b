"""Volumes in a real snapshot pool (XFS on a loop device, ext4 disks)."""

from __future__ import annotations

import subprocess

import pytest

from ember.home import Home
from ember.snapshots import Snapshotter
from ember.snapshots.gc import collect
from ember.volumes.errors import VolumeError, VolumeExists, VolumeInUse, VolumeNotFound
from ember.volumes.store import DEFAULT_VOLUME_SIZE, Volumes, volume_key

pytestmark = [pytest.mark.root, pytest.mark.integration]


def test_create_list_get_and_remove(pool_home: Home) -> None:
    volumes = Volumes(pool_home)
    assert volumes.list() == []  # (no pool was made to find that out)
    made = volumes.create("data", 64 << 20, labels={"team": "a"})
    assert (made.name, made.size, made.labels) == ("data", 64 << 20, {"team": "a"})
    fsck = subprocess.run(["e2fsck", "-fn", str(made.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    # docker volume create of a name it has: that one, unless asked for as another
    assert volumes.create("data") == made == volumes.create("data", 64 << 20)
    for other in ({"size": 128 << 20}, {"labels": {"team": "b"}}):
        with pytest.raises(VolumeExists, match="volume data already exists, with a size of 64"):
            volumes.create("data", **other)  # type: ignore[arg-type]
    with volumes.holding(["other", "data"]) as get:
        assert get("data", True) == made  # an existing one is used as it is
        other = get("other", True)  # a new name: made, of the default size
    assert other.size == DEFAULT_VOLUME_SIZE
    assert [v.name for v in volumes.list()] == ["data", "other"]
    assert volumes.get("data") == made
    volumes.remove("data", lambda name: [])
    with pytest.raises(VolumeNotFound, match="no such volume: data"):
        volumes.get("data")
    with pytest.raises(VolumeNotFound):
        volumes.remove("data", lambda name: [])
    assert not made.path.exists()
    assert [lease.name for lease in Snapshotter(pool_home).leases.list()] == [volume_key("other")]


def test_what_a_volume_holds_outlives_mounts_and_gc(pool_home: Home) -> None:
    volumes = Volumes(pool_home)
    volumes.create("keep", 64 << 20)
    snap = Snapshotter(pool_home)
    with snap.mount(volume_key("keep")) as root:
        (root / "file").write_text("kept")
    assert collect(pool_home).snapshots == []
    with snap.mount(volume_key("keep")) as root:
        assert (root / "file").read_text() == "kept"
    # its lease removed (`snapshot leases rm --force`, a damaged lease file removed as gc's
    # hint says): gc took it as any active snapshot nothing leases, and the machine's next
    # start made an empty one
    snap.leases.delete(volume_key("keep"))
    assert collect(pool_home).snapshots == []
    with snap.mount(volume_key("keep")) as root:
        assert (root / "file").read_text() == "kept"


def test_a_volume_that_is_gone_is_not_made_again_when_a_start_asks(pool_home: Home) -> None:
    volumes = Volumes(pool_home)
    with volumes.holding(["a-vol", "b-vol"]) as get:
        assert get("a-vol", True).name == "a-vol"  # `run -v`: made
        with pytest.raises(VolumeNotFound, match="volume b-vol is gone"):
            get("b-vol", False)  # `start` of a machine that had it
    assert [v.name for v in volumes.list()] == ["a-vol"]


def test_removal_is_refused_while_a_machine_uses_it(pool_home: Home) -> None:
    volumes = Volumes(pool_home)
    volumes.create("busy", 64 << 20)
    asked: list[str] = []

    def users(name: str) -> list[str]:
        asked.append(name)
        return ["web", "worker"]

    with pytest.raises(VolumeInUse, match="volume busy is in use by machine web, worker"):
        volumes.remove("busy", users)
    assert asked == ["busy"] and volumes.get("busy").name == "busy"


def test_a_create_killed_before_its_disk_is_made_leaves_a_name_that_can_be_made(pool_home: Home) -> None:
    snap = Snapshotter(pool_home)
    snap.leases.create(volume_key("half"), snapshots=[volume_key("half")])  # and no disk
    with pytest.raises(VolumeNotFound):
        Volumes(pool_home).get("half")
    assert Volumes(pool_home).create("half", 64 << 20).name == "half"


def test_sizes_are_bounded(pool_home: Home) -> None:
    for size, said in ((1 << 20, "too small"), (1 << 60, "too large"), ((64 << 20) + 1, "4 KiB")):
        with pytest.raises(VolumeError, match=f"volume size .* {said}"):
            Volumes(pool_home).create("sized", size)
