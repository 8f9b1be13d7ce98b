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


def test_a_damaged_lease_file_is_listed_and_named_as_leases_rm_takes_it(tmp_path: Path) -> None:
    """One damaged lease file stopped gc, image rm and `snapshot leases` with no word of
    how to get rid of it: list() still fails (what it protects is unknown), its error
    names the lease as `ember snapshot leases rm` takes it, and scan() lists it."""
    leases = Leases(tmp_path / "leases", tmp_path / "gc.lock")
    leases.create("op/1", ttl=60)
    (tmp_path / "leases" / "prepare%2Fx.json").write_text("{nope")
    with pytest.raises(LeaseError, match="prepare%2Fx.json is damaged") as e:
        leases.list()
    assert e.value.hint is not None and "ember snapshot leases rm prepare/x" in e.value.hint
    good, damaged = leases.scan()
    assert [x.name for x in good] == ["op/1"]
    assert [(d.name, d.path.name) for d in damaged] == [("prepare/x", "prepare%2Fx.json")]
    assert "is damaged" in damaged[0].error.message
    # a file no lease name leads to is named by its path; one that cannot be read is damaged too
    (tmp_path / "leases" / "prepare%2Fx.json").unlink()
    (tmp_path / "leases" / "a b.json").write_text("{nope")
    (tmp_path / "leases" / "dir.json").mkdir()
    _good, damaged = leases.scan()
    hints = {d.path.name: d.error.hint for d in damaged}
    assert hints["a b.json"] == f"remove {tmp_path / 'leases' / 'a b.json'}"
    # (a directory: leases rm, which unlinks, could not remove it)
    assert hints["dir.json"] == f"remove {tmp_path / 'leases' / 'dir.json'}"
    assert "cannot be read" in next(d.error.message for d in damaged if d.name == "dir")
