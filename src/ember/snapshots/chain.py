"""Images to disks: build an image's snapshot chain, clone machine root disks.

One committed snapshot per layer, named by the layer's chain ID, so images that
share base layers share those snapshots.  Building layer N: clone the
snapshot of layers 0..N-1 (or the cached empty ext4), loop-mount it, apply
layer N with ember's hardened unpacker, unmount, check (the superblock of every
layer, ``e2fsck -fn`` of the image's top one; see docs/snapshots.md), commit.
Layer N's commit (I/O waits) runs in a helper thread while layer N+1, cloned
from N's finished disk, is built; a child is never committed before its parent.  A
per-chain-ID lock makes concurrent prepares build each snapshot once (the
second waits, then finds it committed); a temporary lease keeps GC off the
chain meanwhile.  A layer that runs out of blocks or inodes is rebuilt on a
disk twice as big, so the configured base size is a starting point, not a limit.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.fsutil import fsync_file
from ember.home import Home
from ember.locks import FileLock
from ember.snapshots import loop, names, system
from ember.snapshots.errors import (
    CommandFailed,
    PoolError,
    SnapshotError,
    SnapshotExists,
    SnapshotNotFound,
)
from ember.snapshots.snapshotter import Snapshotter
from ember.store.content import ContentStore

if TYPE_CHECKING:
    from ember.images.model import Image, Layer
    from ember.unpack import LayerSession

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
    home: Home,
    image: Image,
    *,
    snapshotter: Snapshotter | None = None,
    layer_path: Callable[[int], Path] | None = None,
    open_layer: Callable[[int], io.RawIOBase | None] | None = None,
) -> PreparedImage:
    """Build (or reuse) the committed snapshots of every layer of ``image``.

    ``layer_path(i)``, when given, is how to get layer ``i``'s blob: it may wait
    for a pull still in progress (``ImageService.pulling``), so that building the
    first layers overlaps downloading the last ones.  ``open_layer(i)`` goes
    further (``Pulling.open_layer``): a layer is built from its blob's first
    bytes as they arrive, unverified until the end (its DiffID is checked, and a
    layer whose download fails is discarded); a rebuild on a bigger disk reads
    the stored blob.  By default the blobs must be in the content store already.
    """
    if open_layer is not None and layer_path is None:
        # a rebuild on a bigger disk reads the stored blob, which may still be arriving
        raise ValueError("prepare_image: open_layer needs layer_path (Pulling gives both)")
    start = time.perf_counter()
    snap = snapshotter or Snapshotter(home)
    if not image.layers:
        raise SnapshotError(
            f"image {image.reference} has no layers: there is no file system to build"
        )
    chain = chain_names(image)
    top = chain[-1]
    built: list[str] = []
    # every layer, not only the top: one whose disk is missing or whose metadata is damaged
    # is built again (its descendants are complete disks of their own, and stay)
    if not all(snap.is_committed(name) for name in reversed(chain)):
        store = ContentStore(home.content)
        content = [str(image.manifest_digest), str(image.config_digest)]
        content += [str(layer.digest) for layer in image.layers]
        with snap.leases.temporary(
            f"prepare/{image.manifest_digest}",
            ttl=PREPARE_LEASE_TTL,
            snapshots=chain,
            content=content,
        ):
            builder = _ChainBuilder(snap, store)
            try:
                parent: str | None = None
                for index, (layer, name) in enumerate(zip(image.layers, chain, strict=True)):
                    if not snap.is_committed(name):
                        lock = FileLock(_chain_lock(snap, name), unlink_on_release=True)
                        lock.acquire()
                        try:
                            # someone else built it while we waited?
                            done = snap.is_committed(name)
                            if not done:
                                # a committed one whose disk is missing or whose metadata
                                # is damaged: built again under its name
                                snap.replace_damaged(name)
                        except BaseException:
                            # (held on, it kept every later prepare of the layer waiting
                            # for as long as this process lives)
                            lock.release()
                            raise
                        if done:
                            lock.release()
                        else:
                            blob = _LayerBlob(store, layer, index, layer_path, open_layer)
                            builder.build(
                                name, parent, layer, blob, top=name == top, chain_lock=lock
                            )
                            built.append(name)
                    parent = name
                builder.finish()
            finally:
                builder.close()
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


class _LayerBlob:
    """Layer ``index``'s blob for its builds: read as it arrives the first time, when
    the pull offers that (``open_layer``), else (and for a rebuild on a bigger disk)
    from the content store, once there (``layer_path`` waits for a pull)."""

    def __init__(
        self, store: ContentStore, layer: Layer, index: int,
        layer_path: Callable[[int], Path] | None,
        open_layer: Callable[[int], io.RawIOBase | None] | None,
    ) -> None:
        self._store, self._layer, self._index = store, layer, index
        self._layer_path = layer_path
        self._open_layer = open_layer

    def take(self) -> tuple[Path, Callable[[], io.RawIOBase | None] | None]:
        """The blob's path and, the first time only, how to open it as it arrives (the
        path then names it in messages, and is read if it turns out stored)."""
        if self._open_layer is not None:
            opener = functools.partial(self._open_layer, self._index)
            self._open_layer = None
            return self._store.path(self._layer.digest), opener
        path = (
            self._layer_path(self._index)
            if self._layer_path is not None
            else self._store.path(self._layer.digest)
        )
        if not path.is_file():
            raise SnapshotError(
                f"layer {self._layer.digest} is not in the content store: pull the image again"
            )
        return path, None


def _chain_lock(snap: Snapshotter, name: str) -> Path:
    return snap.pool.locks / f"chain-{names.encode(name)}.lock"


class _OutOfSpace(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass
class _Built:
    """A layer's snapshot, built and checked, not yet committed; both its locks held."""

    name: str
    key: str
    lock: FileLock  # the snapshot's own
    chain_lock: FileLock  # the chain ID's: concurrent prepares wait on it
    checked: bool


class _ChainBuilder:
    """Builds a run of layers, committing each one while the next is built.

    Layer N+1 starts as a clone of layer N's finished (unmounted, checked) disk
    while it is still a builder's snapshot; layer N's commit (fsync of the disk,
    metadata, renames, directory fsyncs: I/O waits) then runs in a helper thread
    during layer N+1's mount, apply, unmount and check, and is waited for before
    layer N+1 is committed, so a child is never committed before its parent.
    A layer's locks are released once it is committed (or discarded).
    """

    def __init__(self, snap: Snapshotter, store: ContentStore) -> None:
        self.snap = snap
        self.store = store
        self.built: _Built | None = None
        self.committing: Future[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._session: LayerSession | None = None

    def _applier(self) -> LayerSession:
        """One applier process for the whole chain (it moves from disk to disk)."""
        if self._session is None:
            from ember.unpack import LayerSession  # the unpacker is only needed when building

            self._session = LayerSession()
        return self._session

    def build(
        self,
        name: str,
        parent: str | None,
        layer: Layer,
        blob: _LayerBlob,
        *,
        top: bool,
        chain_lock: FileLock,
    ) -> None:
        """Build layer ``name`` (owns ``chain_lock`` from here on, whatever happens) from
        ``blob``, which may still be arriving."""
        try:
            source = self.built.key if self.built is not None and self.built.name == parent else None
            t0 = time.perf_counter()
            size: int | None = None
            while True:
                try:
                    key, lock, checked = self._build_once(
                        name, parent, layer, blob, size, top=top, source=source
                    )
                    break
                except _OutOfSpace as full:
                    if full.size * 2 > MAX_AUTO_SIZE:
                        raise SnapshotError(
                            f"layer {layer.digest} does not fit in a {full.size >> 30} GiB file system"
                        ) from None
                    size = full.size * 2
                    log.info(
                        "layer %s did not fit; retrying on a %d MiB disk", layer.digest, size >> 20
                    )
                    self._drain()  # the parent is committed now: clone it from there
                    source = None
            log.info("built snapshot %s in %.2fs", name, time.perf_counter() - t0)
        except BaseException:
            chain_lock.release()
            raise
        try:
            self._drain()  # the parent's commit, before this layer may be handed to one
        except BaseException as e:
            self._discard(key, lock, e)
            chain_lock.release()
            raise
        self.built = _Built(name, key, lock, chain_lock, checked)

    def _build_once(
        self,
        name: str,
        parent: str | None,
        layer: Layer,
        blob: _LayerBlob,
        size: int | None,
        *,
        top: bool,
        source: str | None,
    ) -> tuple[str, FileLock, bool]:
        snap = self.snap
        key = f"build/{name}/{secrets.token_hex(4)}"
        _active, lock = snap.prepare_held(key, parent, size=size, source=source)
        try:
            self._hand_off()  # cloned: the parent's disk may move to committed/ now
            with snap.mount(key, held=lock) as root:
                try:
                    # the blob as late as possible: a pull may still be fetching it
                    path, opener = blob.take()
                    self._applier().apply(
                        root, path, layer.media_type, layer.diff_id, opener=opener
                    )
                except Exception as e:
                    if _nearly_full(root):
                        raise _OutOfSpace(system.fs_size(snap.path(key))) from e
                    from ember.unpack import DiffIDMismatch, InvalidLayer  # loaded by now

                    if isinstance(e, (InvalidLayer, DiffIDMismatch)):
                        self.store.raise_if_damaged([layer.digest], e)
                    raise
                # Written back now, to know it was: when the pool under this sparse
                # disk runs out, the loop device fails ext4's writes (EIO), and neither
                # the applier nor umount nor the superblock check may notice: the disk
                # would be committed with its files' data missing.
                try:
                    loop.syncfs(root)
                except OSError as e:
                    raise CommandFailed(
                        f"writing layer {name.removeprefix('sha256:')[:12]} to its disk failed: "
                        f"{e.strerror}"
                    ) from e
            mode = snap.config.check
            full = mode == "full" or (mode == "top" and top)
            if mode != "none":
                # first: e2fsck -n does not replay the journal and passes an image that needs it
                snap.check_superblock(key)
            if full:
                # the commit's fsync of the disk, begun now beside the check (both wait
                # on I/O): the commit's own fsync then finds little left to write
                self._helper().submit(_flush_quietly, snap.path(key))
                snap.check(key)
        except BaseException as e:
            pool_full = isinstance(e, Exception) and _pool_nearly_full(snap.pool.root)
            self._discard(key, lock, e)
            if pool_full:
                # what ext4 in the layer's disk says then (I/O errors, a journal that
                # "needs recovery") would send the user looking for corruption
                raise PoolError(
                    f"the snapshot pool {snap.pool.root} is full: building layer "
                    f"{name.removeprefix('sha256:')[:12]} ran out of space",
                    hint=f"free space (ember image rm, ember gc) or grow the pool: {_grow_recipe(snap)}",
                ) from e
            raise
        return key, lock, full

    def _discard(self, key: str, lock: FileLock, cause: BaseException) -> None:
        """Remove a build that failed with ``cause``; a failure here never replaces it."""
        try:
            self.snap.remove(key, held=lock)
        except Exception as e:  # recovery or gc will get it: it is transient
            # after an interrupt, what it left (a busy mount) is expected and recovery's
            # business; otherwise say so
            level = logging.INFO if isinstance(cause, KeyboardInterrupt) else logging.WARNING
            log.log(level, "cannot discard failed build %s (the next ember command removes "
                    "it): %s", key, e)  # fmt: skip
        finally:
            lock.release()

    def _commit(self, b: _Built) -> None:
        try:
            self.snap.commit(b.name, b.key, held=b.lock, checked=b.checked)
        except SnapshotExists as e:
            self._discard(b.key, b.lock, e)
            # Another process's recovery rolled forward the commit of a builder killed
            # while building the same chain ID (recovery does not take chain locks): that
            # disk holds the same layers, complete and checked.  Use it.
            if not self.snap.is_committed(b.name):
                raise
            log.info("snapshot %s was committed meanwhile by recovery; using it", b.name)
        except BaseException as e:
            self._discard(b.key, b.lock, e)
            raise
        finally:
            b.lock.release()  # idempotent after _discard
            b.chain_lock.release()

    def _hand_off(self) -> None:
        """Start committing the finished layer, if there is one, in the helper thread."""
        b, self.built = self.built, None
        if b is None:
            return
        self.committing = self._helper().submit(self._commit, b)

    def _helper(self) -> ThreadPoolExecutor:
        """The helper thread: commits, and what they can do ahead, in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-commit")
        return self._pool

    def _drain(self) -> None:
        """Wait for the commit in flight, if any; raises what it raised."""
        f, self.committing = self.committing, None
        if f is not None:
            f.result()

    def finish(self) -> None:
        """Commit what is left (the top layer)."""
        self._hand_off()
        self._drain()

    def close(self) -> None:
        """After success or failure: a finished layer is still committed (it was complete
        and checked), the commit in flight is waited for; the helper thread ends."""
        try:
            self._hand_off()
            try:
                self._drain()
            except Exception as e:  # the error that got us here matters more
                log.warning("commit after a failed prepare: %s", e)
        finally:
            if self._session is not None:
                self._session.close()
            if self._pool is not None:
                self._pool.shutdown()


def _flush_quietly(disk: Path) -> None:
    """fsync ``disk`` ahead of its commit, which fsyncs it again and reports a failure."""
    with contextlib.suppress(OSError):
        fsync_file(disk)


def _grow_recipe(snap: Snapshotter) -> str:
    """The commands that grow this pool, with its own file, device and mount point."""
    pool = snap.pool
    if pool.image is None:  # a native pool: the file system it lives on is what is full
        return f"free space on the file system holding {pool.root}"
    device = next(
        (m.source for m in system.mounts() if m.mountpoint == pool.root), "/dev/loopN"
    )
    return (f"truncate -s NEWSIZE {pool.image} && losetup -c {device} && "
            f"xfs_growfs {pool.root} (docs/snapshots.md)")


def _pool_nearly_full(pool: Path) -> bool:
    """After a failed build: is the pool itself (not the layer's disk) out of space?  A
    disk in it is a sparse file: when the pool runs out, ext4 inside sees write errors."""
    try:
        st = os.statvfs(pool)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < max(64 << 20, st.f_blocks * st.f_frsize // 100)


def _nearly_full(root: Path) -> bool:
    """After a failed apply: did it fail because blocks or inodes ran out?"""
    st = os.statvfs(root)
    return st.f_bavail * 100 < st.f_blocks * 2 or st.f_favail * 100 < st.f_files


def machine_key(machine_id: str) -> str:
    return names.validate_key(f"machine/{machine_id}", "machine id")


def clone_root_disk(
    home: Home,
    image: Image,
    machine_id: str,
    size: int | None = None,
    *,
    layer_path: Callable[[int], Path] | None = None,
    open_layer: Callable[[int], io.RawIOBase | None] | None = None,
) -> Path:
    """The machine's root disk: a writable clone of the image's top snapshot, grown to ``size``.

    Constant time and space (a reflink and a resize2fs).  A lease named after
    the machine (``machine/<id>``) protects it from GC until
    ``release_root_disk``.  Calling it again for the same machine and image
    returns the existing disk: a restarted machine keeps its root file system.
    ``layer_path`` and ``open_layer``: as for ``prepare_image`` (an image still being
    pulled: its chain is built as its layers arrive).
    """
    snap = Snapshotter(home)
    key = machine_key(machine_id)
    # The lease names the disk and the image's top snapshot before either is made or
    # looked at: GC never sees them unprotected.  (Made after the prepare, it left a
    # moment when a chain built earlier had no lease at all, only the image table's
    # record, which a concurrent `image rm` takes away.)
    top = chain_names(image)[-1:]
    snap.leases.create(key, exist_ok=True, snapshots=[key, *top], labels={"machine": machine_id})
    prepared = prepare_image(
        home, image, snapshotter=snap, layer_path=layer_path, open_layer=open_layer
    )
    if snap.exists(key):
        info = snap.stat(key)
        if info.damaged is not None:
            raise SnapshotError(f"the root disk of machine {machine_id} is damaged: {info.damaged}")
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


def root_disk(home: Home, machine_id: str) -> Path:
    """The root disk ``clone_root_disk`` made for this machine, with the pool mounted (a
    machine started again after a host reboot finds it unmounted); SnapshotNotFound when
    it is gone."""
    snap = Snapshotter.existing(home)
    if snap is None:
        raise SnapshotNotFound(f"no root disk for machine {machine_id}: no snapshot pool in {home.root}")
    return snap.path(machine_key(machine_id))


def release_root_disk(home: Home, machine_id: str) -> None:
    """Remove a machine's root disk and its lease (idempotent)."""
    snap = Snapshotter.existing(home)
    if snap is None:
        return  # no pool, no disk (and no reason to set a pool up)
    key = machine_key(machine_id)
    with contextlib.suppress(SnapshotNotFound):
        snap.remove(key)
    snap.leases.delete(key)
