"""A snapshot's metadata file is an input too: a damaged one gives a clear error, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.snapshots.errors import SnapshotError
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
