"""Building image chains: one ext4 snapshot per layer, shared bases, machine root disks."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ember.home import Home
from ember.oci.digest import Digest
from ember.snapshots import Kind, Snapshotter, system
from ember.snapshots.chain import clone_root_disk, prepare_image, release_root_disk
from ember.snapshots.errors import SnapshotError, SnapshotExists
from ember.store.content import ContentStore
from ember.store.errors import DamagedBlob
from ember.unpack.errors import DiffIDMismatch
from tests.registry.client.proxy import Behaviour, misbehaving_proxy
from tests.snapshots.imagekit import Entry, LayerSpec, base_layers, make_image
from tests.snapshots.leaks import ours
from tests.support.images import layer_digests, push_layout
from tests.support.registry import Registry
from tests.support.treecmp import assert_same_tree, umoci_unpack

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def test_prepare_builds_every_layer_and_checks(home: Home) -> None:
    image = make_image(home, base_layers())
    prepared = prepare_image(home, image)
    chain = [str(layer.chain_id) for layer in image.layers]
    assert prepared.snapshot == chain[-1] and prepared.built == tuple(chain)
    snap = Snapshotter(home)
    assert {s.name for s in snap.list()} == set(chain)
    assert snap.stat(chain[1]).parent == chain[0] and snap.stat(chain[0]).parent is None
    subprocess.run(["e2fsck", "-fn", str(prepared.path)], check=True, capture_output=True)
    with snap.mount(prepared.snapshot) as root:
        assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
        assert (root / "bin/tool").stat().st_mode & 0o777 == 0o755
        assert os.readlink(root / "lib") == "usr/lib"
        assert (root / "etc/motd").read_text() == "hello\n"
    with snap.mount(chain[0]) as root:  # the lower snapshot is untouched by the upper layer
        assert not (root / "etc/motd").exists()
    again = prepare_image(home, image)
    assert again.built == () and again.path == prepared.path
    assert snap.leases.list() == []  # the build's temporary lease is gone


def test_every_layer_of_a_chain_is_complete_on_its_own(home: Home) -> None:
    """Each layer's disk is a clone of its parent's, written while the parent's commit is
    still in flight: every committed disk holds exactly its own layers, whole."""
    layers = [
        LayerSpec([Entry("etc"), Entry(f"etc/f{i}", b"%d" % i), Entry("etc/last", b"%d" % i),
                   *(Entry(f"d{i}/x{j}", b"y") for j in range(50))])
        for i in range(5)
    ]  # fmt: skip
    image = make_image(home, layers)
    prepare_image(home, image)
    snap = Snapshotter(home)
    for i, layer in enumerate(image.layers):
        disk = snap.path(str(layer.chain_id))
        subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True)
        with snap.mount(str(layer.chain_id)) as root:
            assert sorted(os.listdir(root / "etc")) == sorted(["last", *(f"f{k}" for k in range(i + 1))])
            assert (root / "etc/last").read_bytes() == b"%d" % i
            assert all(len(os.listdir(root / f"d{k}")) == 50 for k in range(i + 1))
            assert not (root / f"d{i + 1}").exists()


def test_images_sharing_a_base_share_its_snapshots(home: Home) -> None:
    first = make_image(home, base_layers(), "test/first:1")
    extra = LayerSpec(
        [Entry("app"), Entry("app/main", b"main\n", 0o755), Entry("etc/hostname", b"app\n")]
    )
    second = make_image(home, [*base_layers(), extra], "test/second:1")
    p1 = prepare_image(home, first)
    p2 = prepare_image(home, second)
    assert len(p1.built) == 2
    assert p2.built == (str(second.layers[-1].chain_id),)  # only its own top layer
    snap = Snapshotter(home)
    assert len(snap.list()) == 3
    with snap.mount(p2.snapshot) as root:
        assert (root / "etc/hostname").read_text() == "app\n"
        assert (root / "etc/motd").read_text() == "hello\n"


def test_concurrent_prepares_build_each_snapshot_once(home: Home, tmp_path: Path) -> None:
    layers = [
        *base_layers(),
        LayerSpec([Entry("data"), Entry("data/blob", random_size=24 << 20, seed=1)]),
        LayerSpec([Entry("data/more", random_size=8 << 20, seed=2)]),
    ]
    image = make_image(home, layers)
    script = tmp_path / "prepare.py"
    script.write_text(_PREPARE_SCRIPT)
    (tmp_path / "image.json").write_text(json.dumps(_image_args(image)))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(home.root), str(tmp_path / "image.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    built = [name for r in results for name in r["built"]]
    chain = [str(layer.chain_id) for layer in image.layers]
    assert sorted(built) == sorted(chain)  # every snapshot built exactly once, by one of them
    assert results[0]["path"] == results[1]["path"]


def _image_args(image: object) -> dict[str, object]:
    from ember.images.model import Image

    assert isinstance(image, Image)
    return {
        "reference": image.reference,
        "manifest": str(image.manifest_digest),
        "config": str(image.config_digest),
    }


# Loads an image made by imagekit from the content store (as the image service
# would) and prepares it; prints what it built.
_PREPARE_SCRIPT = """
import json, sys
from ember.home import Home
from ember.images.service import build_image
from ember.oci.config import parse_config
from ember.oci.digest import Digest
from ember.oci.manifest import parse_manifest
from ember.snapshots.chain import prepare_image
from ember.store.content import ContentStore

home = Home(__import__("pathlib").Path(sys.argv[1]))
args = json.load(open(sys.argv[2]))
store = ContentStore(home.content)
md, cd = Digest.parse(args["manifest"]), Digest.parse(args["config"])
image = build_image(args["reference"], md, parse_manifest(store.read_bytes(md)), cd,
                    parse_config(store.read_bytes(cd)))
p = prepare_image(home, image)
print(json.dumps({"built": list(p.built), "path": str(p.path)}))
"""


def test_a_bad_layer_commits_nothing_and_leaks_nothing(home: Home) -> None:
    good = make_image(home, base_layers())
    prepare_image(home, good)
    image = make_image(home, [*base_layers(), LayerSpec([Entry("x", b"x")])])
    # the config promises another DiffID than the (intact) blob has
    top = dataclasses.replace(image.layers[-1], diff_id=Digest.of(b"something else"))
    image = dataclasses.replace(image, layers=[*image.layers[:-1], top])
    with pytest.raises(DiffIDMismatch):
        prepare_image(home, image)
    assert ContentStore(home.content).exists(top.digest)  # the store was not to blame
    snap = Snapshotter(home)
    assert {s.name for s in snap.list()} == {str(layer.chain_id) for layer in good.layers}
    mounts, loops = ours(snap.pool.root)
    assert mounts == [] and loops == []
    assert snap.leases.list() == []


def test_a_layer_committed_meanwhile_by_recovery_is_used(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery rolls a killed builder's finished commit forward without the chain's lock:
    a prepare building that chain ID meanwhile failed at its own commit (the name taken)
    instead of using the complete disk now there."""
    image = make_image(home, base_layers())
    chain = [str(layer.chain_id) for layer in image.layers]
    real_commit = Snapshotter.commit
    raced: list[str] = []

    def commit(self: Snapshotter, name: str, key: str, **kw: Any) -> Any:
        if name == chain[0] and not raced:
            # what recovery does with a killed builder's disk of the same layer
            other = f"build/{name}/killed"
            self.prepare(other, None)
            with self.mount(key, held=kw.get("held")) as src, self.mount(other) as dst:
                subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
            real_commit(self, name, other)
            raced.append(name)
        return real_commit(self, name, key, **kw)

    monkeypatch.setattr(Snapshotter, "commit", commit)
    prepared = prepare_image(home, image)
    assert raced == [chain[0]] and prepared.snapshot == chain[-1]
    snap = Snapshotter(home)
    assert {(s.name, s.kind) for s in snap.list()} == {(c, Kind.COMMITTED) for c in chain}
    with snap.mount(prepared.snapshot) as root:
        assert (root / "etc/motd").read_text() == "hello\n"
    mounts, loops = ours(snap.pool.root)
    assert mounts == [] and loops == []


def test_a_layer_blob_damaged_in_the_store_is_removed_and_named(home: Home) -> None:
    """A stored layer blob changed on disk failed every prepare with a gzip or DiffID
    error, and pulling again changed nothing (a pull skips the blobs the store has)."""
    image = make_image(home, [*base_layers(), LayerSpec([Entry("x", b"x")])])
    store_path = home.content / "blobs" / "sha256" / image.layers[-1].digest.hex
    os.chmod(store_path, 0o644)
    store_path.write_bytes(gzip.compress(b"\0" * 1024))
    with pytest.raises(DamagedBlob, match=f"blob {image.layers[-1].digest} in the content store no longer"):
        prepare_image(home, image)
    assert not store_path.exists()
    snap = Snapshotter(home)
    assert str(image.layers[-1].chain_id) not in {s.name for s in snap.list()}
    assert ours(snap.pool.root) == ([], [])


def test_image_without_layers_is_refused(home: Home) -> None:
    image = make_image(home, [])
    with pytest.raises(SnapshotError, match="no layers"):
        prepare_image(home, image)


def test_machine_root_disk_clone_grow_release(home: Home) -> None:
    image = make_image(home, base_layers())
    disk = clone_root_disk(home, image, "m1", 3 << 30)
    snap = Snapshotter(home)
    info = snap.stat("machine/m1")
    assert (
        info.kind is Kind.ACTIVE
        and info.path == disk
        and info.parent == str(image.layers[-1].chain_id)
    )
    assert system.fs_size(disk) == 3 << 30 and os.stat(disk).st_size == 3 << 30
    subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True)
    lease = snap.leases.get("machine/m1")
    assert "machine/m1" in lease.snapshots and lease.expires is None
    with snap.mount("machine/m1") as root:
        (root / "state").write_text("machine data")
    # asking again (a restart) keeps the machine's disk
    assert clone_root_disk(home, image, "m1", 3 << 30) == disk
    with snap.mount("machine/m1") as root:
        assert (root / "state").read_text() == "machine data"
    other = make_image(home, [LayerSpec([Entry("other", b"1")])], "test/other:1")
    with pytest.raises(SnapshotExists, match="another image"):
        clone_root_disk(home, other, "m1")
    default = clone_root_disk(home, image, "m2")  # no size: the image's own file system size
    assert system.fs_size(default) == 1 << 30
    release_root_disk(home, "m1")
    release_root_disk(home, "m1")  # idempotent
    assert not snap.exists("machine/m1")
    assert [lease.name for lease in snap.leases.list()] == ["machine/m2"]


def test_copy_backend_builds_the_same_content(copy_home: Home) -> None:
    image = make_image(copy_home, base_layers())
    prepared = prepare_image(copy_home, image)
    subprocess.run(["e2fsck", "-fn", str(prepared.path)], check=True, capture_output=True)
    snap = Snapshotter(copy_home)
    assert snap.pool.backend.name == "copy"
    with snap.mount(prepared.snapshot) as root:
        assert (root / "etc/motd").read_text() == "hello\n"
        assert os.readlink(root / "lib") == "usr/lib"
    disk = clone_root_disk(copy_home, image, "m", 2 << 30)
    assert system.fs_size(disk) == 2 << 30


def test_a_layer_too_big_for_the_disk_grows_it(tmp_path: Path) -> None:
    """Out of inodes or blocks in the base ext4: the build retries on a disk twice as big."""
    from tests.snapshots.conftest import make_home, teardown_home

    home = make_home(tmp_path / "small", base_size="64M")
    try:
        many = LayerSpec([Entry("many"), *(Entry(f"many/f{i}", b"") for i in range(20000))])
        big = LayerSpec([Entry("big", os.urandom(140 << 20))])
        image = make_image(home, [*base_layers(), many, big])
        prepared = prepare_image(home, image)
        snap = Snapshotter(home)
        sizes = [system.fs_size(snap.path(str(layer.chain_id))) for layer in image.layers]
        assert sizes[:2] == [64 << 20, 64 << 20]
        assert sizes[2] > 64 << 20 and sizes[3] > sizes[2]  # grown for inodes, then for space
        subprocess.run(["e2fsck", "-fn", str(prepared.path)], check=True, capture_output=True)
        with snap.mount(prepared.snapshot) as root:
            assert len(os.listdir(root / "many")) == 20000
            assert (root / "big").stat().st_size == 140 << 20
        assert not [s.name for s in snap.list() if s.kind is Kind.ACTIVE]
    finally:
        teardown_home(home)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_committed_snapshot_whose_disk_is_gone_is_built_again(home: Home, how: str) -> None:
    """With committed/<top>/disk.ext4 deleted (or truncated), prepare said 'all 5 layer
    snapshot(s) already built' and printed the path; ls showed 0 B."""
    image = make_image(home, base_layers())
    chain = [str(layer.chain_id) for layer in image.layers]
    prepare_image(home, image)
    snap = Snapshotter(home)
    disk = snap.path(chain[-1])
    if how == "deleted":
        disk.unlink()
    else:
        disk.chmod(0o644)
        os.truncate(disk, 0)
    assert not snap.is_committed(chain[-1])
    info = next(s for s in snap.list() if s.name == chain[-1])
    reason = "disk.ext4 is missing" if how == "deleted" else "too small to hold an ext4"
    assert info.damaged is not None and reason in info.damaged, info.damaged
    again = prepare_image(home, image)
    assert again.built == (chain[-1],) and again.path.is_file()
    assert snap.is_committed(chain[-1]) and snap.stat(chain[-1]).damaged is None
    subprocess.run(["e2fsck", "-fn", str(again.path)], check=True, capture_output=True)


def test_damaged_metadata_in_a_chain_keeps_its_parents_and_is_built_again(home: Home) -> None:
    """gc removed the parents of a snapshot whose meta.json it could not read, and prepare
    reused that snapshot."""
    from ember.snapshots.gc import Roots, collect

    third = LayerSpec([Entry("etc/third", b"3\n")])
    image = make_image(home, [*base_layers(), third])
    chain = [str(layer.chain_id) for layer in image.layers]
    prepare_image(home, image)
    other = make_image(home, [LayerSpec([Entry("other", b"o")])], "test/other:1")
    garbage = prepare_image(home, other).snapshot  # no image needs it
    snap = Snapshotter(home)
    meta = snap.path(chain[1]).parent / "meta.json"
    meta.write_bytes(b'{"key": "damaged')
    assert not snap.is_committed(chain[1])

    def roots() -> Roots:  # the image as the image table would have it
        return Roots({chain[-1]}, {layer.digest for layer in image.layers})

    report = collect(home, roots=roots())
    assert report.snapshots == []
    assert all(snap.exists(name) for name in [*chain, garbage])
    assert any(chain[1] in w and "damaged" in w for w in report.warnings)
    assert any("kept 2 unreferenced committed snapshot(s)" in w for w in report.warnings)

    again = prepare_image(home, image)
    assert again.built == (chain[1],)  # the top above it is intact: a disk of its own
    assert all(snap.is_committed(name) for name in chain)
    assert snap.stat(chain[1]).parent == chain[0]
    with snap.mount(chain[1]) as root:
        assert (root / "etc/motd").read_text() == "hello\n" and not (root / "etc/third").exists()
    report = collect(home, roots=roots())
    assert report.snapshots == [garbage] and report.warnings == []


def test_a_full_pool_is_said_so_not_a_damaged_journal(tmp_path: Path) -> None:
    """ext4 in a layer's sparse disk sees write errors when the pool under it runs out,
    and the build failed its superblock check: "its journal needs recovery"."""
    from ember.snapshots.errors import PoolError
    from tests.snapshots.conftest import make_home, teardown_home

    home = make_home(tmp_path / "small", pool_size="300M")
    try:
        prepare_image(home, make_image(home, [LayerSpec([Entry("a", b"a")])], "test/a:1"))
        pool = Snapshotter(home).pool.root
        st = os.statvfs(pool)
        filler = pool / "filler"  # all but 8 MiB of the pool taken
        subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (8 << 20)), str(filler)],
                       check=True)  # fmt: skip
        big = make_image(home, [LayerSpec([Entry("big", random_size=24 << 20, seed=3)])], "test/big:1")
        with pytest.raises(PoolError, match="snapshot pool .* is full") as full:
            prepare_image(home, big)
        # the recipe names this pool's file, loop device and mount point
        assert f"truncate -s NEWSIZE {Snapshotter(home).pool.image} && losetup -c /dev/loop" in str(full.value)
        filler.unlink()
        assert prepare_image(home, big).built  # with room again it builds
    finally:
        teardown_home(home)


def test_a_layer_is_built_from_its_first_bytes_while_they_arrive(
    home: Home, registry: Registry, multilayer_layout: Path
) -> None:
    """``open_layer``: the first layer's disk gets files while the proxy holds back the rest
    of its blob; the pull then cancelled, that build is discarded and nothing leaks."""
    from ember.images import ImageService
    from ember.images.cancel import PullCancelled

    ref = push_layout(multilayer_layout, registry, "chain/streamed")
    service = ImageService(home)
    failures: list[BaseException] = []
    # ISA-L hands out 1 MiB of tar at a time: let through enough of the 1 MB blob for that
    stall = 700_000
    with misbehaving_proxy(registry.host, Behaviour(stall_blob_after=stall)) as proxy:
        with (
            pytest.raises(RuntimeError, match="seen"),
            service.pulling(ref.replace(registry.host, proxy.host, 1), progress=False) as pulled,
        ):
            first = pulled.image.layers[0]
            assert first.size > stall  # busybox's layer: its symlinks come first

            def prepare() -> None:
                try:
                    prepare_image(
                        home, pulled.image, layer_path=pulled.layer_path,
                        open_layer=pulled.open_layer,
                    )  # fmt: skip
                except BaseException as e:
                    failures.append(e)

            preparing = threading.Thread(target=prepare)
            preparing.start()
            deadline = time.monotonic() + 60
            while not any(os.path.lexists(f"{m}/bin/[") for m in ours(home.root)[0]):
                assert time.monotonic() < deadline, "no file of the first layer while it arrived"
                assert preparing.is_alive(), failures
                time.sleep(0.02)
            assert not service.content.exists(first.digest)
            raise RuntimeError("seen")  # ends the pull: the stalled download is cancelled
        preparing.join(60)
    assert not preparing.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], PullCancelled), failures
    snap = Snapshotter(home)
    assert [s.name for s in snap.list()] == []  # the build was discarded, nothing committed


def test_a_root_disk_is_cloned_from_a_chain_built_as_its_layers_arrive(
    home: Home, registry: Registry, multilayer_layout: Path
) -> None:
    """What ``ember run`` does for an image that is not local (``lifecycle.create``):
    ``clone_root_disk`` given the pull's ``layer_path`` and ``open_layer`` builds the
    chain while the last layer is held back by the registry, and clones the disk once
    it arrives."""
    from ember.images import ImageService

    ref = push_layout(multilayer_layout, registry, "chain/streamed-disk")
    service = ImageService(home)
    built: list[Path] = []
    failures: list[BaseException] = []
    held = layer_digests(multilayer_layout)[-1]
    with (
        misbehaving_proxy(registry.host, Behaviour(hold_blobs={held.hex})) as proxy,
        service.pulling(ref.replace(registry.host, proxy.host, 1), progress=False) as pulled,
    ):
        last = pulled.image.layers[-1]
        assert last.digest == held

        def clone() -> None:
            try:
                built.append(clone_root_disk(
                    home, pulled.image, "e" * 64, layer_path=pulled.layer_path,
                    open_layer=pulled.open_layer,
                ))  # fmt: skip
            except BaseException as e:
                failures.append(e)

        cloning = threading.Thread(target=clone)
        cloning.start()
        snap = Snapshotter(home)
        below = [str(layer.chain_id) for layer in pulled.image.layers[:-1]]
        deadline = time.monotonic() + 60
        while not all(snap.exists(name) for name in below):
            assert time.monotonic() < deadline, "the lower layers were not built"
            assert cloning.is_alive(), failures
            time.sleep(0.02)
        assert cloning.is_alive() and not service.content.exists(last.digest)
        proxy.release()
        cloning.join(60)
    assert not failures and len(built) == 1, failures
    with Snapshotter(home).mount(f"machine/{'e' * 64}") as root:
        assert (root / "bin" / "busybox").is_file()
    release_root_disk(home, "e" * 64)


def test_a_chain_built_as_its_layers_arrive_equals_umoci_unpack(
    home: Home, registry: Registry, multilayer_layout: Path, tmp_path: Path
) -> None:
    from ember.images import ImageService

    ref = push_layout(multilayer_layout, registry, "chain/streamed-whole")
    service = ImageService(home)
    # ~0.5 s for the biggest blob: its layer is built while it arrives
    with (
        misbehaving_proxy(registry.host, Behaviour(blob_rate=2_000_000)) as proxy,
        service.pulling(ref.replace(registry.host, proxy.host, 1), progress=False) as pulled,
    ):
        prepared = prepare_image(
            home, pulled.image, layer_path=pulled.layer_path, open_layer=pulled.open_layer
        )
    subprocess.run(["e2fsck", "-fn", str(prepared.path)], check=True, capture_output=True)
    expected = umoci_unpack(multilayer_layout, "latest", tmp_path / "umoci")
    with Snapshotter(home).mount(prepared.snapshot) as root:
        assert_same_tree(expected, root, ignore=("lost+found",))


def test_a_root_disk_clone_of_a_built_chain_is_never_without_a_lease(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the chain built already, ``prepare_image`` takes no lease, and the machine's
    lease came only after it returned: a gc in that moment (the image removed
    meanwhile) deleted the chain, and the clone failed.  Now the machine's lease names
    the image's top before the prepare."""
    from ember.snapshots import chain
    from ember.snapshots.gc import collect

    image = make_image(home, base_layers())
    real = chain.prepare_image
    real(home, image)  # built; the image table does not name it (as after `image rm`)

    def prepare_then_gc(*args: Any, **kwargs: Any) -> chain.PreparedImage:
        prepared = real(*args, **kwargs)
        collect(home)  # another command's gc, right then
        return prepared

    monkeypatch.setattr(chain, "prepare_image", prepare_then_gc)
    disk = clone_root_disk(home, image, "ab" * 32)
    subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True)


def _unreadable(meta: Path, how: str) -> None:
    """``meta`` made unreadable for a reason other than "missing"."""
    meta.unlink()
    if how == "directory":  # EISDIR
        meta.mkdir()
    else:  # ELOOP
        meta.symlink_to(meta.name)


@pytest.mark.parametrize("how", ["directory", "symlink-loop"])
def test_metadata_that_cannot_be_read_is_damage(home: Home, how: str) -> None:
    """A meta.json that could not be read for a reason other than "missing" (EISDIR,
    ELOOP, EIO) raised from the lookups: prepare, snapshot ls, gc and rm all failed on
    it, and rm could not remove it (it lists the snapshots to find children)."""
    from ember.snapshots.gc import Roots, collect

    third = LayerSpec([Entry("etc/third", b"3\n")])
    image = make_image(home, [*base_layers(), third])
    chain = [str(layer.chain_id) for layer in image.layers]
    prepare_image(home, image)
    snap = Snapshotter(home)
    _unreadable(snap.path(chain[1]).parent / "meta.json", how)
    assert not snap.is_committed(chain[1])
    info = next(s for s in snap.list() if s.name == chain[1])
    assert info.damaged is not None and "cannot be read" in info.damaged, info.damaged
    report = collect(home, roots=Roots({chain[-1]}, {layer.digest for layer in image.layers}))
    assert report.snapshots == [] and any(chain[1] in w for w in report.warnings)
    again = prepare_image(home, image)  # built again under its name
    assert again.built == (chain[1],) and snap.is_committed(chain[1])
    # and rm removes one (a top: nothing is built on it)
    _unreadable(snap.path(chain[-1]).parent / "meta.json", how)
    snap.remove(chain[-1], respect_leases=True)
    assert not snap.exists(chain[-1])


def test_a_lookup_failing_under_the_chain_lock_releases_it(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """is_committed raising after the chain ID's lock was taken left that lock held for
    the life of the process: every later prepare of the layer waited on it."""
    from ember.locks import is_held
    from ember.snapshots.chain import _chain_lock

    image = make_image(home, base_layers())
    snap = Snapshotter(home)
    name = str(image.layers[0].chain_id)
    assert len(image.layers) > 1  # the look before the build stops at the top
    looks: list[str] = []

    def is_committed(key: str) -> bool:
        looks.append(key)
        if looks.count(name) == 2:  # the layer's look, then its look under its lock
            raise OSError(5, "Input/output error")
        return False

    monkeypatch.setattr(snap, "is_committed", is_committed)
    with pytest.raises(OSError, match="Input/output"):
        prepare_image(home, image, snapshotter=snap)
    assert looks.count(name) == 2 and not is_held(_chain_lock(snap, name))
