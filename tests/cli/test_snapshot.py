"""``ember image prepare``, ``ember snapshot ls/rm`` and ``ember gc`` end to end."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.home import Home
from tests.snapshots.conftest import SNAPSHOT_ENV, make_home, teardown_home
from tests.snapshots.leaks import ours
from tests.support.cli import ember_env, run_ember

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands run here inherit the environment: only the test home's config counts."""
    for var in SNAPSHOT_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    """A state directory with a small snapshot pool, checked for leaks on teardown."""
    h = make_home(tmp_path / "home")
    yield h
    teardown_home(h)


def ember(home: Home, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return run_ember(*args, env=ember_env(home.root), check=ok)


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
    # a leased parent: --force would pass over the lease, not the children, so it is
    # not suggested (it was, and then refused)
    from ember.snapshots import Snapshotter

    leases = Snapshotter(home).leases
    leases.create("machine/p", snapshots=[top["parent"]])
    leased = ember(home, "snapshot", "rm", top["parent"], ok=False)
    assert "held by lease 'machine/p'" in leased.stderr and "--force" not in leased.stderr
    leases.delete("machine/p")
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
    Snapshotter(home).leases.create("machine/x", snapshots=[left[0]["name"]])
    leases_out = ember(home, "snapshot", "leases").stdout
    assert leases_out.splitlines()[0].split() == ["NAME", "EXPIRES", "SNAPSHOTS", "BLOBS"]
    assert re.search(r"^machine/x +never expires +1 +\d+$", leases_out, re.M), leases_out
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


def _commit(snap: object, name: str, parent: str | None = None) -> None:
    from ember.snapshots import Snapshotter

    assert isinstance(snap, Snapshotter)
    snap.prepare(f"build/{name}", parent)
    snap.commit(name, f"build/{name}")


def test_rm_takes_names_as_ls_prints_them(home: Home) -> None:
    """`snapshot ls` prints sha256:5234507c3472, and `snapshot rm` of it (or of
    5234507c3472) said "no snapshot"."""
    from ember.snapshots import Snapshotter

    snap = Snapshotter(home)
    one, two = "sha256:abc1" + "0" * 60, "sha256:abc2" + "0" * 60
    for name in (one, two):
        _commit(snap, name)
    listed = ember(home, "snapshot", "ls").stdout
    assert "sha256:abc100000000 " in listed
    ambiguous = ember(home, "snapshot", "rm", "abc", ok=False)
    assert ambiguous.returncode == 2
    assert "'abc' matches 2 snapshots (sha256:abc100000000, sha256:abc200000000)" in ambiguous.stderr
    assert ember(home, "snapshot", "rm", "sha256:abc100000000").stdout == "sha256:abc100000000\n"
    assert ember(home, "snapshot", "rm", "abc2").stdout == "abc2\n"  # what it was given
    assert not snap.exists(one) and not snap.exists(two)
    missing = ember(home, "snapshot", "rm", "abc", ok=False)
    assert missing.returncode == 1 and "no snapshot 'abc'" in missing.stderr


def test_rm_goes_on_after_a_refusal_and_fails_at_the_end(home: Home) -> None:
    """`snapshot rm PARENT TOP` stopped at the parent's refusal and never tried TOP; and
    --force, which the docs said overrides the parent check, must not (children keep their
    parent's name)."""
    from ember.snapshots import Snapshotter

    snap = Snapshotter(home)
    base, mid, top = ("sha256:" + c * 64 for c in "123")
    _commit(snap, base)
    _commit(snap, mid, base)
    _commit(snap, top, mid)
    snap.prepare("lone")
    res = ember(home, "snapshot", "rm", "--force", base, "no-such", "lone", ok=False)
    assert res.returncode == 1 and res.stdout == "lone\n"
    errors = res.stderr.splitlines()
    assert len(errors) == 2 and all(line.startswith("ember: ") for line in errors)
    assert f"snapshot {base!r} is the parent of 1" in errors[1] and "no snapshot 'no-such'" in errors[0]
    assert snap.is_committed(base) and not snap.exists("lone")
    # named together, children go first: all three
    res = ember(home, "snapshot", "rm", base, top, mid)
    assert res.stdout.splitlines() == [top, mid, base]
    assert snap.list() == []


def test_leases_show_a_dead_owner_and_can_be_removed(home: Home) -> None:
    from ember.snapshots import Snapshotter
    from ember.snapshots.leases import Owner

    leases = Snapshotter(home).leases
    me = Owner.current()
    assert me is not None
    leases.create("prepare/dead", ttl=21600, snapshots=["a"],
                  owner=dataclasses.replace(me, start=me.start - 1))  # fmt: skip
    leases.create("machine/m1", snapshots=["machine/m1"], labels={"machine": "m1"})
    shown = ember(home, "snapshot", "leases").stdout
    assert re.search(rf"^prepare/dead +expired \(its process {me.pid} is gone\) +1 ", shown, re.M)
    assert re.search(r"^machine/m1 +never expires ", shown, re.M)
    listed = json.loads(ember(home, "snapshot", "leases", "ls", "--json").stdout)
    assert {(x["name"], x["expired"]) for x in listed} == {("prepare/dead", True), ("machine/m1", False)}
    res = ember(home, "snapshot", "leases", "rm", "prepare/dead", "machine/m1", "nope", ok=False)
    assert res.returncode == 1 and res.stdout == "prepare/dead\n"
    assert "keeps machine m1's root disk" in res.stderr and "no lease 'nope'" in res.stderr
    assert ember(home, "snapshot", "leases", "rm", "-f", "machine/m1").stdout == "machine/m1\n"
    assert json.loads(ember(home, "snapshot", "leases", "--json").stdout) == []


def test_a_volumes_lease_and_disk_go_with_ember_volume_rm(home: Home) -> None:
    from ember.volumes.store import Volumes

    Volumes(home).create("data")
    res = ember(home, "snapshot", "leases", "rm", "volume/data", ok=False)
    assert res.returncode == 1 and "lease 'volume/data' is volume data's" in res.stderr
    assert "ember volume rm data" in res.stderr
    res = ember(home, "snapshot", "rm", "-f", "volume/data", ok=False)
    assert res.returncode == 1 and "snapshot 'volume/data' is volume data" in res.stderr
    assert ember(home, "volume", "rm", "data").stdout == "data\n"
    assert json.loads(ember(home, "snapshot", "leases", "--json").stdout) == []


def test_library_warnings_are_ember_messages(tmp_path: Path, multilayer_layout: Path) -> None:
    """A warning from the snapshotter was printed bare, a stray line among `ember: ...` ones."""
    home = make_home(tmp_path / "copy", backend="copy")
    try:
        res = ember(home, "image", "prepare", f"oci:{multilayer_layout}:latest")
        lines = res.stderr.splitlines()
        warning = [line for line in lines if "every layer and machine disk is a full copy" in line]
        assert len(warning) == 1 and warning[0].startswith("ember: snapshot backend 'copy'")
    finally:
        teardown_home(home)


def test_gc_says_what_it_swept_of_killed_commands(home: Home) -> None:
    """The temp files of writers killed before their rename (config.json's, net/'s) are
    counted, as everything else gc removes (old enough: a live command's are left alone;
    the machine directories are tests/snapshots/test_gc.py's)."""
    import os
    import time

    net = home.net_state.parent
    net.mkdir()
    temps = [home.root / ".config.json.abcd1234.tmp", net / ".state.json.abcd1234.tmp"]
    young = home.root / ".accel.json.abcd1234.tmp"
    for t in [*temps, young]:
        t.write_bytes(b"x" * 1024)
    hour_ago = time.time() - 3600
    for t in temps:
        os.utime(t, (hour_ago, hour_ago))
    dry = json.loads(ember(home, "gc", "--dry-run", "--json").stdout)
    assert (dry["machine_dirs"], dry["temp_files"], dry["leftover_bytes"]) == (0, 2, 2048)
    assert all(t.exists() for t in temps)
    out = ember(home, "gc").stdout
    assert "0 leftover machine dir(s), 2 temp file(s)" in out, out
    assert "2.0 KiB of leftovers" in out, out
    assert not any(t.exists() for t in temps) and young.exists()


def test_a_machines_root_disk_is_not_removed_under_it_even_forced(home: Home) -> None:
    """`snapshot rm --force machine/ID` of a running machine removed its disk (the VMM
    wrote on into a deleted file; its next start failed): it is its machine's to remove."""
    from ember.machines.store import MachineStore
    from ember.snapshots import Snapshotter
    from ember.snapshots.chain import clone_root_disk
    from tests.snapshots.imagekit import base_layers, make_image

    machine_id = "cd" * 32
    clone_root_disk(home, make_image(home, base_layers()), machine_id)
    record = MachineStore(home).dir(machine_id)
    record.mkdir(parents=True)
    refused = ember(home, "snapshot", "rm", "--force", f"machine/{machine_id}", ok=False)
    assert refused.returncode != 0, refused.stdout
    assert f"is the root disk of machine {machine_id[:12]}" in refused.stderr
    assert f"ember rm {machine_id[:12]}" in refused.stderr
    assert Snapshotter(home).exists(f"machine/{machine_id}")
    record.rmdir()  # the machine gone (its disk left over): the disk may go by hand
    ember(home, "snapshot", "rm", "--force", f"machine/{machine_id}")
    assert not Snapshotter(home).exists(f"machine/{machine_id}")


def test_a_damaged_lease_is_listed_and_removed_by_the_name_gc_gives(home: Home) -> None:
    """One damaged lease file made `snapshot leases` fail too, and gc's error did not say
    how to get rid of it."""
    from ember.snapshots import Snapshotter

    leases = Snapshotter(home).leases
    leases.create("machine/m1", snapshots=["machine/m1"], labels={"machine": "m1"})
    (leases.dir / "prepare%2Fbad.json").write_text("{nope")
    shown = ember(home, "snapshot", "leases")
    assert re.search(r"^prepare/bad +damaged ", shown.stdout, re.M), shown.stdout
    assert re.search(r"^machine/m1 +never expires ", shown.stdout, re.M), shown.stdout
    assert "prepare%2Fbad.json is damaged" in shown.stderr
    listed = json.loads(ember(home, "snapshot", "leases", "ls", "--json").stdout)
    damaged = {x["name"]: x["damaged"] for x in listed}
    assert damaged["machine/m1"] is None and "is damaged" in damaged["prepare/bad"]
    gc = ember(home, "gc", ok=False)
    assert gc.returncode != 0
    hint = re.search(r"ember snapshot leases rm (\S+) removes it", gc.stderr)
    assert hint, gc.stderr
    assert ember(home, "snapshot", "leases", "rm", hint.group(1)).stdout == "prepare/bad\n"
    ember(home, "gc")
    assert [x["name"] for x in json.loads(ember(home, "snapshot", "leases", "--json").stdout)] == [
        "machine/m1"
    ]
