"""Metadata and lease files are inputs too: damaged ones give clear errors, never crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.snapshots.errors import LeaseError, SnapshotError
from ember.snapshots.leases import Lease, Leases
from ember.snapshots.model import Kind, Meta


def test_meta_roundtrip() -> None:
    meta = Meta("sha256:" + "a" * 64, Kind.COMMITTED, None, 1.5, {"a": "b"}, False)
    assert Meta.load(meta.dump(), Path("m")) == meta


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"key": "k"}',
        b'{"key": "k", "kind": "weird", "parent": null, "created": 1}',
        b'{"key": "k", "kind": "active", "parent": 5, "created": 1}',
        b'{"key": "k", "kind": "active", "parent": null, "created": "x"}',
        b'{"key": "k", "kind": "active", "parent": null, "created": 1, "labels": {"a": 1}}',
        b'{"key": "k", "kind": "active", "parent": null, "created": 1, "labels": []}',
    ],
)
def test_damaged_meta_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(SnapshotError, match="damaged"):
        Meta.load(data, Path("/x/meta.json"))


def test_damaged_lease_files(tmp_path: Path) -> None:
    leases = Leases(tmp_path / "leases", tmp_path / "gc.lock")
    leases.create("ok", ttl=60)
    (tmp_path / "leases" / "bad.json").write_text("{nope")
    with pytest.raises(LeaseError, match="damaged"):
        leases.get("bad")
    (tmp_path / "leases" / "bad.json").write_text('{"name": "bad"}')
    with pytest.raises(LeaseError, match="damaged"):
        leases.list()
    assert Lease.from_json({"name": "n", "created": 1, "expires": None}, Path("p")).expires is None
