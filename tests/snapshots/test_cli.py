"""``ember image prepare``, ``ember snapshot ls/rm`` and ``ember gc`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember.home import Home
from tests.snapshots.leaks import ours

pytestmark = [pytest.mark.root, pytest.mark.integration]


def ember(home: Home, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ember"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EMBER_HOME": str(home.root)},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_prepare_ls_rm_gc(home: Home, busybox_layout: Path, multilayer_layout: Path) -> None:
    out = json.loads(
        ember(home, "image", "prepare", f"oci:{multilayer_layout}:latest", "--json").stdout
    )
    assert set(out) == {"image", "snapshot", "path", "seconds"}
    assert out["image"].startswith("sha256:") and Path(out["path"]).is_file()
    subprocess.run(["e2fsck", "-fn", out["path"]], check=True, capture_output=True)
    again = json.loads(
        ember(home, "image", "prepare", f"oci:{multilayer_layout}:latest", "--json").stdout
    )
    assert again["path"] == out["path"]

    listed = json.loads(ember(home, "snapshot", "ls", "--json").stdout)
    top = next(s for s in listed if s["name"] == out["snapshot"])
    assert {"name", "parent", "kind", "size", "usage"} <= set(top)
    assert top["kind"] == "committed" and top["parent"] is not None and top["usage"] > 0
    assert "committed" in ember(home, "snapshot", "ls").stdout

    bad = ember(home, "snapshot", "rm", top["parent"], ok=False)
    assert bad.returncode != 0 and "parent of" in bad.stderr and bad.stderr.count("\n") == 1
    missing = ember(home, "snapshot", "rm", "no-such", ok=False)
    assert missing.returncode != 0 and "no snapshot" in missing.stderr
    ember(home, "snapshot", "rm", out["snapshot"])

    # what is left of the chain is garbage once the image is gone from the table
    ember(home, "image", "prepare", f"oci:{busybox_layout}:latest")
    ember(home, "image", "rm", f"oci:{multilayer_layout}:latest")
    report = json.loads(ember(home, "gc", "--json").stdout)
    assert len(report["snapshots"]) == len(listed) - 2  # busybox's one layer is kept
    assert report["snapshot_bytes"] >= 0
    left = json.loads(ember(home, "snapshot", "ls", "--json").stdout)
    assert len(left) == 1
    assert "removed 0 snapshot(s)" in ember(home, "gc").stdout
    assert json.loads(ember(home, "snapshot", "leases", "--json").stdout) == []
    from ember.snapshots import Snapshotter

    Snapshotter(home).leases.create("machine/x", snapshots=[left[0]["name"]])
    assert "machine/x  never expires  1 snapshot(s)" in ember(home, "snapshot", "leases").stdout
    # what a lease holds (a machine's root disk) is not removed by hand unless forced
    held = ember(home, "snapshot", "rm", left[0]["name"], ok=False)
    assert held.returncode != 0 and "held by lease 'machine/x'" in held.stderr
    assert held.stderr.count("\n") == 1 and "--force" in held.stderr
    assert len(json.loads(ember(home, "snapshot", "ls", "--json").stdout)) == 1
    ember(home, "snapshot", "rm", "--force", left[0]["name"])
    assert json.loads(ember(home, "snapshot", "ls", "--json").stdout) == []


def test_looking_at_a_fresh_home_sets_no_pool_up(home: Home) -> None:
    """gc (dry run or not), snapshot ls/leases/rm on a home without a pool made a sparse
    pool file, formatted it and mounted it, to report that there was nothing."""
    assert json.loads(ember(home, "gc", "--dry-run", "--json").stdout)["snapshots"] == []
    ember(home, "gc")
    assert json.loads(ember(home, "snapshot", "ls", "--json").stdout) == []
    assert json.loads(ember(home, "snapshot", "leases", "--json").stdout) == []
    rm = ember(home, "snapshot", "rm", "sha256:" + "0" * 64, ok=False)
    assert rm.returncode != 0 and "no snapshot" in rm.stderr
    assert not (home.snapshots / "pool.json").exists()
    assert not (home.snapshots / "pool.img").exists()
    assert ours(home.root) == ([], [])
