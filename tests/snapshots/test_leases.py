"""Lease files are inputs too: damaged ones give clear errors, never crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.snapshots.errors import LeaseError
from ember.snapshots.leases import Lease, Leases


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
