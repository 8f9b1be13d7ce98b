"""Leases and mark-and-sweep GC over real snapshots, images and content."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ember.home import Home
from ember.images import ImageService
from ember.snapshots import Snapshotter
from ember.snapshots.chain import clone_root_disk, prepare_image
from ember.snapshots.errors import LeaseError, LeaseNotFound, RootsUnreadable
from ember.snapshots.gc import collect
from ember.store.content import ContentStore
from tests.snapshots.imagekit import Entry, LayerSpec, base_layers, make_image

pytestmark = [pytest.mark.root, pytest.mark.integration]


def test_leases_create_add_expire_delete(home: Home) -> None:
    leases = Snapshotter(home).leases
    lease = leases.create("op/1", ttl=3600, snapshots=["a"], content=["sha256:" + "1" * 64])
    assert lease.expires is not None and not lease.expired()
    leases.add("op/1", snapshots=["b", "a"])
    assert leases.get("op/1").snapshots == ("a", "b")
    with pytest.raises(LeaseError, match="exists"):
        leases.create("op/1")
    leases.create("op/1", exist_ok=True, snapshots=["c"])
    assert leases.get("op/1").snapshots == ("a", "b", "c")
    leases.discard("op/1", snapshots=["b"])
    assert leases.get("op/1").snapshots == ("a", "c")
    short = leases.create("op/2", ttl=0.01)
    time.sleep(0.05)
    assert short.expired()
    with pytest.raises(LeaseError, match="expired"):
        leases.add("op/2", snapshots=["x"])
    assert leases.delete("op/1") and not leases.delete("op/1")
    with pytest.raises(LeaseNotFound):
        leases.get("op/1")
    with leases.temporary("prepare", ttl=60) as tmp:
        assert leases.get(tmp.name).name == tmp.name
    assert [x.name for x in leases.list()] == ["op/2"]


def test_gc_keeps_what_images_and_leases_need(home: Home, busybox_layout: Path) -> None:
    service = ImageService(home)
    kept_image = service.pull(f"oci:{busybox_layout}:latest", progress=False)
    kept = prepare_image(home, kept_image)
    # an image that is then forgotten by the image table: its snapshots and blobs are garbage
    gone = make_image(home, [*base_layers(), LayerSpec([Entry("gone", b"1" * 100000)])])
    gone_prepared = prepare_image(home, gone)
    # a machine disk (leased), a stray active snapshot (no lease), an expired lease
    machine_image = make_image(home, [LayerSpec([Entry("m", b"m")])], "test/machine:1")
    clone_root_disk(home, machine_image, "vm1")
    snap = Snapshotter(home)
    snap.prepare("stray", kept.snapshot)
    snap.leases.create("old", ttl=0.001, snapshots=[gone_prepared.snapshot])
    time.sleep(0.01)
    # a snapshot being built right now (its lock held) is never collected
    _active, busy = snap.prepare_held("build/busy", None)
    try:
        dry = collect(home, dry_run=True)
        assert snap.exists("stray") and "stray" in dry.snapshots
        report = collect(home)
    finally:
        busy.release()

    left = {s.name for s in snap.list()}
    assert kept.snapshot in left
    assert "machine/vm1" in left and str(machine_image.layers[-1].chain_id) in left
    assert "stray" not in left and gone_prepared.snapshot not in left
    assert not any(str(layer.chain_id) in left for layer in gone.layers)
    assert "build/busy" in left and "build/busy" in report.skipped
    assert report.leases == ["old"]
    assert report.snapshot_bytes > 0

    store = ContentStore(home.content)
    assert all(store.exists(layer.digest) for layer in kept_image.layers)
    assert store.exists(kept_image.manifest_digest) and store.exists(kept_image.config_digest)
    assert not any(store.exists(layer.digest) for layer in gone.layers[-1:])
    assert str(gone.manifest_digest) in report.content and report.content_bytes > 0

    # nothing else to collect; the abandoned build goes once its lock is free
    second = collect(home)
    assert second.snapshots == ["build/busy"] and second.content == []
    assert prepare_image(home, kept_image).built == ()


def test_gc_keeps_the_layers_a_failed_prepare_finished(
    home: Home, multilayer_layout: Path
) -> None:
    """A prepare that fails (or is killed) keeps the layers it committed for the next one
    to build on (docs/snapshots.md); gc marked from the image's top snapshot only, which
    did not exist, and removed them all."""
    image = ImageService(home).pull(f"oci:{multilayer_layout}:latest", progress=False)
    prepare_image(home, image)
    snap = Snapshotter(home)
    *finished, top = [str(layer.chain_id) for layer in image.layers]
    snap.remove(top)  # as if the prepare had failed on the last layer
    collect(home)
    assert all(snap.exists(name) for name in finished)
    assert prepare_image(home, image).built == (top,)


def test_gc_spares_the_blobs_a_running_command_claims(home: Home, busybox_layout: Path) -> None:
    """An unpack of a local image claims its blobs (ember.images.locking); `image rm`
    then forgets the image while the unpack still reads them: gc must not delete them."""
    from ember.images.locking import Claims

    service = ImageService(home)
    image = service.pull(f"oci:{busybox_layout}:latest", progress=False)
    digests = [image.manifest_digest, image.config_digest, *(layer.digest for layer in image.layers)]
    store = ContentStore(home.content)
    with Claims(home).hold(digests):
        service.remove(image.reference)
        report = collect(home, content_grace=0)
        assert all(store.exists(d) for d in digests), report.content
    assert set(collect(home, content_grace=0).content) >= {str(d) for d in digests}


def test_gc_stops_before_removing_anything_when_an_image_cannot_be_read(
    home: Home, busybox_layout: Path
) -> None:
    """Which layers a damaged image needs is unknown: deleting blobs no root names
    would delete them blindly."""
    image = ImageService(home).pull(f"oci:{busybox_layout}:latest", progress=False)
    store = ContentStore(home.content)
    store.delete(image.config_digest)
    with pytest.raises(RootsUnreadable, match="gc stopped, nothing removed"):
        collect(home, content_grace=0)
    assert all(store.exists(layer.digest) for layer in image.layers)


def test_gc_never_removes_a_chain_a_prepare_is_building(home: Home) -> None:
    """A prepare's temporary lease protects the lower layers it has already committed."""
    image = make_image(home, base_layers())
    snap = Snapshotter(home)
    chain = [str(layer.chain_id) for layer in image.layers]
    with snap.leases.temporary("prepare/test", ttl=600, snapshots=chain):
        prepare_image(home, make_image(home, base_layers()[:1], "test/lower:1"))
        report = collect(home)
        assert chain[0] not in report.snapshots and snap.is_committed(chain[0])
    assert chain[0] in collect(home).snapshots


def test_gc_drops_machine_templates_nothing_used_for_a_while(home: Home, tmp_path: Path) -> None:
    from ember.vm.template import UNUSED_FOR
    from tests.support.templates import age, make_template

    _, old = make_template(home, tmp_path, "old")
    _, recent = make_template(home, tmp_path, "recent")
    age(home, old, UNUSED_FOR + 3600)
    report = collect(home, dry_run=True)
    assert report.templates == [old] and report.template_bytes > 5000
    assert (home.templates / f"{old}.vmstate").exists()
    report = collect(home, templates_unused_for=UNUSED_FOR)
    assert report.to_json()["templates"] == [old]
    assert not (home.templates / f"{old}.vmstate").exists()
    assert (home.templates / f"{recent}.vmstate").exists()


def test_a_lease_file_naming_another_lease_stops_gc(home: Home) -> None:
    """A stray copy of a machine's lease, expired, must not make gc delete the real one
    (and the machine's disk with it on the next run)."""
    snap = Snapshotter(home)
    snap.leases.create("machine/m1", snapshots=["machine/m1"])
    snap.prepare("machine/m1")
    copy = json.loads((snap.pool.leases / "machine%2Fm1.json").read_text())
    copy["expires"] = time.time() - 1
    (snap.pool.leases / "old-copy.json").write_text(json.dumps(copy))
    for _ in range(2):
        with pytest.raises(LeaseError, match="old-copy.json is damaged: it holds lease"):
            collect(home)
    assert snap.leases.get("machine/m1").expires is None and snap.exists("machine/m1")


def test_a_damaged_lease_stops_gc_and_image_rm_and_says_how_to_remove_it(home: Home) -> None:
    """gc and image rm stop on a damaged lease file (what it protects is unknown), and
    said nothing of how to go on."""
    snap = Snapshotter(home)
    snap.prepare("machine/m1")
    (snap.pool.leases / "machine%2Fm1.json").write_text('{"name": "machine/m1"')
    for stopped in (lambda: collect(home), lambda: ImageService(home).remove("test/x:1")):
        with pytest.raises(LeaseError, match=r"machine%2Fm1.json is damaged") as e:
            stopped()
        assert "ember snapshot leases rm machine/m1" in str(e.value)
    assert snap.exists("machine/m1")


def test_a_lease_whose_expiry_is_not_a_number_is_damaged(home: Home) -> None:
    """'expires': NaN was read as a lease that never expires (NaN compares false)."""
    snap = Snapshotter(home)
    snap.leases.create("op/1", ttl=60)
    path = snap.pool.leases / "op%2F1.json"
    path.write_text(path.read_text().replace('"expires": ', '"expires": NaN, "was": '))
    with pytest.raises(LeaseError, match="op%2F1.json is damaged: a time that is not a number"):
        snap.leases.get("op/1")


def _pool_free(snap: Snapshotter) -> int:
    """The pool's free space once XFS has freed what was deleted (see gc._settled_free)."""
    deadline = time.monotonic() + 10
    last = -1
    while True:
        os.sync()
        st = os.statvfs(snap.pool.root)
        free = st.f_bavail * st.f_frsize
        if free == last or time.monotonic() > deadline:
            return free
        last = free
        time.sleep(0.5)


def test_gc_reports_the_space_it_frees_and_a_dry_run_the_same(home: Home) -> None:
    """XFS frees an unlinked file's blocks in the background: statvfs right after the sweep
    saw none of them ("freed 4.0 KiB" for ~240 MB).  A dry run said 0 B, and 0 partial
    downloads while the real run then removed some."""
    big = LayerSpec([Entry("big"), Entry("big/data", random_size=48 << 20, seed=3)])
    image = make_image(home, [*base_layers(), big])
    prepare_image(home, image)
    snap = Snapshotter(home)
    chain = {str(layer.chain_id) for layer in image.layers}
    store = ContentStore(home.content)
    stale = store.ingest_dir / f"sha256-{'e' * 64}"
    stale.write_bytes(b"p" * 100_000)
    os.utime(stale, (time.time() - 7200,) * 2)
    fresh = store.ingest_dir / f"sha256-{'f' * 64}"  # may still be resumed: kept
    fresh.write_bytes(b"q" * 10)

    before = _pool_free(snap)
    dry = collect(home, dry_run=True)
    assert set(dry.snapshots) == chain and (dry.ingests, dry.ingest_bytes) == (1, 100_000)
    assert stale.exists() and all(snap.is_committed(name) for name in chain)
    report = collect(home)
    freed = _pool_free(snap) - before
    assert set(report.snapshots) == chain and (report.ingests, report.ingest_bytes) == (1, 100_000)
    assert not stale.exists() and fresh.exists()
    # ingest_grace 0 (`ember gc --ingest-grace 0`): the fresh one too, none being written
    assert (collect(home, ingest_grace=0).ingests, fresh.exists()) == (1, False)
    assert freed > 48 << 20
    assert abs(report.snapshot_bytes - freed) < 256 << 10, (report.snapshot_bytes, freed)
    # the dry run's figure comes from the disks' extents (FIEMAP), which leave out what XFS
    # keeps for them besides (preallocation past the end, extent maps): about 3% here
    assert freed * 0.9 < dry.snapshot_bytes <= freed, (dry.snapshot_bytes, freed)


def test_a_lease_lives_with_its_owner_process(home: Home) -> None:
    """Owned leases end with their process; pid reuse and reboots cannot keep one alive;
    leases without an owner (machines, and files older ember wrote) keep their TTL only."""
    from ember.snapshots.leases import Owner

    leases = Snapshotter(home).leases
    me = Owner.current()
    assert me is not None and me.pid == os.getpid() and me.alive()
    with leases.temporary("prepare/x", ttl=3600) as tmp:
        assert tmp.owner == me and not leases.get(tmp.name).expired()
    child = subprocess.Popen(["sleep", "60"])
    try:
        theirs = Owner.current()
        assert theirs is not None
        theirs = dataclasses.replace(theirs, pid=child.pid)
        with open(f"/proc/{child.pid}/stat", "rb") as f:  # (comm "(sleep)" may hold spaces)
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
        alive = dataclasses.replace(theirs, start=start)
        assert alive.alive()
        assert not dataclasses.replace(alive, start=start - 1).alive()  # the pid was reused
        assert not dataclasses.replace(alive, boot="another-boot").alive()  # rebooted since
        assert dataclasses.replace(alive, pidns="pid:[1]").alive()  # cannot tell: its TTL
        leases.create("op/child", ttl=3600, owner=alive)
    finally:
        child.kill()
        child.wait()
    assert not alive.alive()
    assert leases.get("op/child").expired() and leases.get("op/child").orphaned()
    assert collect(home).leases == ["op/child"]

    # a lease file as older ember wrote it: no owner, loads, and only its TTL ends it
    legacy = {"name": "op/old", "created": time.time(), "expires": time.time() + 60,
              "snapshots": ["a"], "content": [], "labels": {}}  # fmt: skip
    (leases.dir / "op%2Fold.json").write_text(json.dumps(legacy))
    old = leases.get("op/old")
    assert old.owner is None and not old.expired() and not old.orphaned()
    leases.create("op/old", exist_ok=True, snapshots=["b"])
    assert "owner" not in json.loads((leases.dir / "op%2Fold.json").read_text())
    for bad in ({"pid": "1", "start": 1, "boot": "b"}, {"pid": 1, "boot": "b"}):
        (leases.dir / "op%2Fbad.json").write_text(json.dumps({**legacy, "name": "op/bad", "owner": bad}))
        with pytest.raises(LeaseError, match="op%2Fbad.json is damaged"):
            leases.get("op/bad")


def test_gc_drops_partial_downloads_on_a_full_disk(tmp_path: Path, busybox_layout: Path) -> None:
    """A pull that filled the disk leaves its partial download for a resume; the remedy its
    error names, `ember gc --ingest-grace 0`, failed: the image database could not even
    be opened on the full file system ("disk I/O error")."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        home = Home(small / "home")
        ImageService(home).pull(f"oci:{busybox_layout}:latest", progress=False)  # a database
        store = ContentStore(home.content)
        partial = store.ingest_dir / f"sha256-{'a' * 64}"
        with open(partial, "wb") as f, pytest.raises(OSError):  # the disk fills up
            while True:
                f.write(b"x" * 65536)
                f.flush()
        report = collect(home, ingest_grace=0)
        assert report.ingests == 1 and not partial.exists()
        assert len(ImageService(home).list()) == 1  # and the database opens again
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)  # the database may still be open


def test_gc_sweeps_what_commands_killed_half_way_left(home: Home) -> None:
    """A kill -9 of `ember rm` while it deleted the renamed directory, of `ember run`
    before its machine's first record, or of any atomic_write before its rename left
    files no command ever removed (disk space only: none is read)."""
    snap = Snapshotter(home)
    snap.leases.create("op/keep")
    machines = home.machines
    tomb = machines / f".removing-{'a' * 64}"
    tomb.mkdir(parents=True)
    (tomb / "console.log").write_bytes(b"l" * 100)
    unrecorded = machines / ("b" * 64)
    unrecorded.mkdir()
    (unrecorded / ".state.json.abcd1234.tmp").write_bytes(b"s" * 10)
    machine = machines / ("c" * 64)
    machine.mkdir()
    (machine / "state.json").write_text("{}")  # a record, damaged or not: the machine stays
    temps = [
        machine / ".run.config.abcd1234.tmp",
        home.root / ".config.json.abcd1234.tmp",
        home.snapshots / ".pool.json.abcd1234.tmp",
        home.snapshots / "leases" / ".op%2Fkeep.json.abcd1234.tmp",
        home.net_state.parent / ".state.json.abcd1234.tmp",
    ]
    home.net_state.parent.mkdir()
    for t in temps:
        t.write_bytes(b"t")
    kept = home.snapshots / "leases" / "op%2Fkeep.json"
    assert kept.is_file()

    fresh = collect(home)  # all of it a moment old: a live command's, maybe
    assert (fresh.machine_dirs, fresh.temp_files, fresh.leftover_bytes) == (0, 0, 0)
    dry = collect(home, dry_run=True, leftover_grace=0)
    assert (dry.machine_dirs, dry.temp_files, dry.leftover_bytes) == (2, 5, 115)
    assert tomb.exists() and unrecorded.exists() and all(t.exists() for t in temps)
    report = collect(home, leftover_grace=0)
    assert report.to_json()["machine_dirs"] == 2 and report.to_json()["temp_files"] == 5
    assert report.leftover_bytes == 115
    assert not tomb.exists() and not unrecorded.exists() and not any(t.exists() for t in temps)
    assert {p.name for p in machines.iterdir()} - {".names.lock"} == {"c" * 64}
    assert (machine / "state.json").exists() and kept.is_file()
    assert (home.root / "config.json").is_file()
    assert [x.name for x in snap.leases.list()] == ["op/keep"]


def test_gc_sweeps_what_killed_vm_side_runs_left_only_while_nothing_uses_it(
    home: Home, tmp_path: Path
) -> None:
    """A kill -9 during a KVM probe, a kernel install or a template build leaves its work
    directory; during an atomic write of the default kernel, of a custom kernel's vmlinux
    or of a template's shape, a temp file.  gc removes them once old, but not a work
    directory whose install or build lock is held, and nothing through a symlink."""
    from ember.locks import FileLock

    def leftover(path: Path, size: int) -> Path:
        path.mkdir(parents=True)
        (path / "data").write_bytes(b"x" * size)
        return path

    probe = leftover(home.run / "accel-probe-k2j4x9aa", 10)
    install = leftover(home.kernels / ".install-6.1.0-28-amd64.q8w7e6r5", 100)
    key = "ab" * 32
    build = leftover(home.templates / f".build-{key}-zx81_a2b", 1000)
    temps = [
        home.kernels / ".default.abcd1234.tmp",
        home.custom_kernels / ("cd" * 32) / ".vmlinux.abcd1234.tmp",
        home.templates / f".{key}.json.abcd1234.tmp",
    ]
    for t in temps:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_bytes(b"t")
    # a symlink named like a work dir, and a custom kernel directory that is a symlink:
    # what they point at is not ember's
    outside = leftover(tmp_path / "outside", 1)
    (outside / ".vmlinux.abcd1234.tmp").write_bytes(b"o")
    (home.run / "accel-probe-linked").symlink_to(outside)
    (home.custom_kernels / ("ef" * 32)).symlink_to(outside)

    fresh = collect(home)  # a moment old: a live run's, maybe
    assert (fresh.work_dirs, fresh.temp_files) == (0, 0)
    with FileLock(home.kernel_install_lock), FileLock(home.templates / f"{key}.lock"):
        busy = collect(home, leftover_grace=0)
    assert (busy.work_dirs, busy.temp_files, busy.leftover_bytes) == (1, 3, 13)
    assert not probe.exists() and install.exists() and build.exists()
    assert not any(t.exists() for t in temps)
    dry = collect(home, dry_run=True, leftover_grace=0)
    assert (dry.work_dirs, dry.leftover_bytes) == (2, 1100) and install.exists()
    report = collect(home, leftover_grace=0)
    assert report.to_json()["work_dirs"] == 2 and report.leftover_bytes == 1100
    assert not install.exists() and not build.exists()
    assert sorted(p.name for p in outside.iterdir()) == [".vmlinux.abcd1234.tmp", "data"]
    assert (home.run / "accel-probe-linked").is_symlink()


def test_gc_keeps_a_machines_root_disk_while_its_record_exists_even_without_its_lease(
    home: Home,
) -> None:
    """`ember snapshot leases rm --force machine/ID` of a running machine, then `ember gc`:
    the machine's root disk went to the trash under its VMM, which wrote on into a
    deleted file.  Its lease was all that kept it; a machine's record keeps it now, as a
    container record does in containerd."""
    import shutil

    from ember.machines.store import MachineStore

    image = make_image(home, [LayerSpec([Entry("m", b"m")])], "test/machine:1")
    machine_id = "ab" * 32
    disk = clone_root_disk(home, image, machine_id)
    record = MachineStore(home).dir(machine_id)
    record.mkdir(parents=True)
    snap = Snapshotter(home)
    assert snap.leases.delete(f"machine/{machine_id}")
    collect(home)
    assert snap.exists(f"machine/{machine_id}") and disk.is_file()
    shutil.rmtree(record)  # `ember rm` done, but for its disk
    assert f"machine/{machine_id}" in collect(home).snapshots


def _kernel_dir(path: Path, age: float) -> Path:
    path.mkdir(parents=True)
    (path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 60)
    then = time.time() - age
    for p in (path / "vmlinux", path):
        os.utime(p, (then, then))
    return path


def test_gc_removes_the_kernels_no_machine_boots(home: Home, tmp_path: Path) -> None:
    """A kernel update installs a new Debian version (~470 MB with its modules) and
    makes it the default: the old one stayed for ever, as did the ELFs extracted from
    bzImages users brought (kernels/custom/<sha256>, ~60 MB each)."""
    import secrets

    from ember.machines.state import MachineState, VMConfig
    from ember.machines.store import MachineStore

    kernels = home.kernels
    hour = 3600.0
    old_default = _kernel_dir(kernels / "6.1.0-1-amd64", hour)
    booted_old = _kernel_dir(kernels / "6.1.0-0-amd64", hour)
    current = _kernel_dir(kernels / "6.1.0-2-amd64", hour)
    (kernels / "default").symlink_to(current.name)
    then = time.time() - hour
    os.utime(kernels / "default", (then, then), follow_symlinks=False)
    unused_custom = _kernel_dir(kernels / "custom" / ("a" * 64), hour)
    booted_custom = _kernel_dir(kernels / "custom" / ("b" * 64), hour)
    fresh_custom = _kernel_dir(kernels / "custom" / ("c" * 64), 1)  # a run may be using it
    for name, kernel in (("m1", booted_old), ("m2", booted_custom)):
        st = MachineState(
            id=secrets.token_hex(32), name="", image="oci:/x:latest",
            image_digest="sha256:" + "0" * 64, created_at="2026-01-01T00:00:00.000+00:00",
            command=["true"], config={},
            vm=VMConfig("qemu", "tcg", str(kernel / "vmlinux"), "/i", "/d", 512, 1),
        )  # fmt: skip
        MachineStore(home).create(st, name)

    # each kernel's cached base initramfs archives (a few MB each) stayed for ever: they go with it
    archives = home.initramfs_cache
    archives.mkdir()
    for version in ("6.1.0-1-amd64", f"custom-{'a' * 12}", "6.1.0-2-amd64", f"custom-{'b' * 12}"):
        for key in ("0123456789abcdef", "fedcba9876543210"):
            (archives / f"{version}-{key}.cpio").write_bytes(b"x" * 10)
    (archives / "6.1.0-1-amd64-notakey.cpio").write_bytes(b"x")  # not an archive of ours
    for p in archives.iterdir():
        os.utime(p, (time.time() - 2 * hour, time.time() - 2 * hour))
    # made a moment ago (a custom kernel whose modules' directory has the removed
    # version's name; a machine being made about to link it): kept
    (archives / "6.1.0-1-amd64-00000000000000aa.cpio").write_bytes(b"x" * 10)

    dry = collect(home, dry_run=True, leftover_grace=600)
    assert sorted(dry.kernels) == ["6.1.0-1-amd64", f"custom/{'a' * 64}"]
    assert old_default.is_dir() and unused_custom.is_dir()
    assert len(list(archives.iterdir())) == 10
    report = collect(home, leftover_grace=600)
    assert sorted(report.kernels) == sorted(dry.kernels)
    assert report.kernel_bytes == dry.kernel_bytes == 2 * 64 + 4 * 10
    assert not old_default.exists() and not unused_custom.exists()
    assert all(d.is_dir() for d in (booted_old, current, booted_custom, fresh_custom))
    assert sorted(p.name for p in archives.iterdir()) == [
        "6.1.0-1-amd64-00000000000000aa.cpio", "6.1.0-1-amd64-notakey.cpio",
        "6.1.0-2-amd64-0123456789abcdef.cpio", "6.1.0-2-amd64-fedcba9876543210.cpio",
        f"custom-{'b' * 12}-0123456789abcdef.cpio", f"custom-{'b' * 12}-fedcba9876543210.cpio",
    ]  # fmt: skip

    # a kernels directory shared between state directories (a symlink): theirs to judge
    shared = tmp_path / "shared-kernels"
    kernels.rename(shared)
    kernels.symlink_to(shared)
    (shared / "default").unlink()
    (shared / "default").symlink_to("6.1.0-0-amd64")
    os.utime(shared / "default", (then, then), follow_symlinks=False)
    assert collect(home, leftover_grace=600).kernels == []
    assert current.name in os.listdir(shared)


def test_gc_drops_the_lease_of_a_machine_whose_run_was_killed_before_its_record(
    home: Home,
) -> None:
    """The machine's lease is made as its run begins (before the pull): an `ember run`
    killed during the pull left it, with no machine, and it kept the image's whole chain
    for good.  Once the machine has no directory, for as long as leftovers are kept,
    gc drops it; a machine that exists keeps its lease."""
    from ember.machines.state import MachineState, VMConfig
    from ember.machines.store import MachineStore

    image = make_image(home, base_layers())
    top = str(image.layers[-1].chain_id)
    prepare_image(home, image)
    snap = Snapshotter(home)
    alive, killed = "ab" * 32, "cd" * 32
    MachineStore(home).create(
        MachineState(
            id=alive, name="", image="oci:/x:latest", image_digest="sha256:" + "0" * 64,
            created_at="2026-01-01T00:00:00.000+00:00", command=["true"], config={},
            vm=VMConfig("qemu", "tcg", "/k", "/i", "/d", 512, 1),
        ),
        "alive",
    )  # fmt: skip
    for machine_id in (alive, killed):
        snap.leases.create(f"machine/{machine_id}", snapshots=[top], labels={"machine": machine_id})
    kept = collect(home)  # both younger than the leftovers' grace
    assert kept.leases == [] and snap.is_committed(top)
    report = collect(home, leftover_grace=0)
    assert report.leases == [f"machine/{killed}"]
    assert [lease.name for lease in snap.leases.list()] == [f"machine/{alive}"]
    assert snap.is_committed(top)  # the living machine's lease still keeps it
