"""Images to disks: build an image's snapshot chain, clone machine root disks.

One committed snapshot per layer, named by the layer's chain ID, so images that
share base layers share those snapshots.  Building layer N: clone the
snapshot of layers 0..N-1 (or make an empty ext4), loop-mount it, apply layer N
with ember's hardened unpacker, unmount, check (the superblock of every layer,
``e2fsck -fn`` of the image's top one; see docs/snapshots.md), commit.  A
per-chain-ID lock makes concurrent prepares build each snapshot once (the
second waits, then finds it committed); a temporary lease keeps GC off the
chain meanwhile.  A layer that runs out of blocks or inodes is rebuilt on a
disk twice as big, so the configured base size is a starting point, not a limit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.home import Home
from ember.snapshots import names, system
from ember.snapshots.errors import SnapshotError, SnapshotExists, SnapshotNotFound
from ember.snapshots.locks import FileLock
from ember.snapshots.snapshotter import Snapshotter
from ember.store.content import ContentStore

if TYPE_CHECKING:
    from ember.images.model import Image, Layer

log = logging.getLogger("ember.snapshots")

#: a prepare that takes longer than this loses GC protection (a dead process's lease must expire)
PREPARE_LEASE_TTL = 6 * 3600.0
#: layers that do not fit grow their disk by doubling, up to this
MAX_AUTO_SIZE = 1 << 40


@dataclass(frozen=True)
class PreparedImage:
    manifest_digest: str
    snapshot: str  # the committed snapshot of the whole image: its top chain ID
    path: Path  # that snapshot's ext4 image
    built: tuple[str, ...]  # snapshots this call built (the rest were reused)
    seconds: float


def chain_names(image: Image) -> list[str]:
    return [str(layer.chain_id) for layer in image.layers]


def prepare_image(
    home: Home, image: Image, *, snapshotter: Snapshotter | None = None
) -> PreparedImage:
    """Build (or reuse) the committed snapshots of every layer of ``image``."""
    start = time.perf_counter()
    snap = snapshotter or Snapshotter(home)
    if not image.layers:
        raise SnapshotError(
            f"image {image.reference} has no layers: there is no file system to build"
        )
    chain = chain_names(image)
    top = chain[-1]
    built: list[str] = []
    if not snap.is_committed(top):
        store = ContentStore(home.content)
        content = [str(image.manifest_digest), str(image.config_digest)]
        content += [str(layer.digest) for layer in image.layers]
        with snap.leases.temporary(
            f"prepare/{image.manifest_digest}",
            ttl=PREPARE_LEASE_TTL,
            snapshots=chain,
            content=content,
        ):
            parent: str | None = None
            for layer, name in zip(image.layers, chain, strict=True):
                if not snap.is_committed(name):
                    with FileLock(_chain_lock(snap, name), unlink_on_release=True):
                        if not snap.is_committed(name):  # someone else built it while we waited
                            _build_layer(snap, store, name, parent, layer, top=name == top)
                            built.append(name)
                parent = name
    if snap.config.check != "none" and not snap.fully_checked(top):
        # the top was built as another image's intermediate layer (superblock-checked
        # only), or before checks were recorded: a machine boots it, so check it fully once
        with FileLock(_chain_lock(snap, top), unlink_on_release=True):
            snap.ensure_checked(top)
    return PreparedImage(
        manifest_digest=str(image.manifest_digest),
        snapshot=top,
        path=snap.path(top),
        built=tuple(built),
        seconds=time.perf_counter() - start,
    )


def _chain_lock(snap: Snapshotter, name: str) -> Path:
    return snap.pool.locks / f"chain-{names.encode(name)}.lock"


class _OutOfSpace(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _build_layer(
    snap: Snapshotter,
    store: ContentStore,
    name: str,
    parent: str | None,
    layer: Layer,
    *,
    top: bool,
) -> None:
    """Build one layer's snapshot; a layer that does not fit is retried on a disk twice as big."""
    blob = store.path(layer.digest)
    if not blob.is_file():
        raise SnapshotError(
            f"layer {layer.digest} is not in the content store: pull the image again"
        )
    t0 = time.perf_counter()
    size: int | None = None
    while True:
        try:
            _build_once(snap, name, parent, layer, blob, size, top=top)
            break
        except _OutOfSpace as full:
            if full.size * 2 > MAX_AUTO_SIZE:
                raise SnapshotError(
                    f"layer {layer.digest} does not fit in a {full.size >> 30} GiB file system"
                ) from None
            size = full.size * 2
            log.info("layer %s did not fit; retrying on a %d MiB disk", layer.digest, size >> 20)
    log.info("built snapshot %s in %.2fs", name, time.perf_counter() - t0)


def _build_once(
    snap: Snapshotter,
    name: str,
    parent: str | None,
    layer: Layer,
    blob: Path,
    size: int | None,
    *,
    top: bool,
) -> None:
    from ember.unpack import apply_layer  # the unpacker is only needed when building

    key = f"build/{name}/{secrets.token_hex(4)}"
    _active, lock = snap.prepare_held(key, parent, size=size)
    try:
        with snap.mount(key, held=lock) as root:
            try:
                apply_layer(root, blob, layer.media_type, layer.diff_id)
            except Exception as e:
                if _nearly_full(root):
                    raise _OutOfSpace(system.fs_size(snap.path(key))) from e
                raise
        mode = snap.config.check
        full = mode == "full" or (mode == "top" and top)
        if mode != "none":
            # first: e2fsck -n does not replay the journal and passes an image that needs it
            snap.check_superblock(key)
        if full:
            snap.check(key)
        snap.commit(name, key, held=lock, checked=full)
    except BaseException:
        try:
            snap.remove(key, held=lock)
        except SnapshotError as e:  # recovery or gc will get it: it is transient
            log.warning("cannot discard failed build %s: %s", key, e)
        raise
    finally:
        lock.release()


def _nearly_full(root: Path) -> bool:
    """After a failed apply: did it fail because blocks or inodes ran out?"""
    st = os.statvfs(root)
    return st.f_bavail * 100 < st.f_blocks * 2 or st.f_favail * 100 < st.f_files


def machine_key(machine_id: str) -> str:
    return names.validate_key(f"machine/{machine_id}", "machine id")


def clone_root_disk(home: Home, image: Image, machine_id: str, size: int | None = None) -> Path:
    """The machine's root disk: a writable clone of the image's top snapshot, grown to ``size``.

    Constant time and space (a reflink and a resize2fs).  A lease named after
    the machine (``machine/<id>``) protects it from GC until
    ``release_root_disk``.  Calling it again for the same machine and image
    returns the existing disk: a restarted machine keeps its root file system.
    """
    snap = Snapshotter(home)
    key = machine_key(machine_id)
    prepared = prepare_image(home, image, snapshotter=snap)
    # the lease names the disk (and the image snapshot it is cloned from) before the
    # disk exists: GC never sees either unprotected
    snap.leases.create(
        key, exist_ok=True, snapshots=[key, prepared.snapshot], labels={"machine": machine_id}
    )
    if snap.exists(key):
        info = snap.stat(key)
        if info.parent != prepared.snapshot:
            raise SnapshotExists(
                f"machine {machine_id} already has a root disk from another image; release it first"
            )
        return info.path
    active = snap.prepare(
        key,
        prepared.snapshot,
        size=size,
        labels={"machine": machine_id, "image": prepared.manifest_digest},
    )
    return active.path


def release_root_disk(home: Home, machine_id: str) -> None:
    """Remove a machine's root disk and its lease (idempotent)."""
    snap = Snapshotter(home)
    key = machine_key(machine_id)
    with contextlib.suppress(SnapshotNotFound):
        snap.remove(key)
    snap.leases.delete(key)
