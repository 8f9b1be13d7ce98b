"""Mark-and-sweep garbage collection of snapshots, content and leases.

Roots: every image in the image table (its manifest, config, layers, the
index it came from, and its chain of snapshots) and every live lease.  Marked
snapshots keep their parents.  Everything else goes: expired leases (or
leases whose owner process is gone), active snapshots nobody leases (stale),
committed snapshots no root reaches, blobs no image or lease names and stale
partial downloads; also what commands killed half-way (SIGKILL) left that nothing
else removes (``sweep_leftovers``).  A damaged snapshot is kept with its parents,
and when its metadata cannot be read (its parents unknown) every committed snapshot
is kept; the report's warnings say so.

Runs under the image service's lock (no pull in progress) and the exclusive GC lock; lease changes take it shared, so a lease
made by a concurrent prepare is either seen or not yet made (and then the
prepare has not started building).  A snapshot whose lock is held (being
built or mounted) is skipped, never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.fsutil import remove_tree, stale_temps, stale_work_dirs, tree_bytes
from ember.home import Home
from ember.locks import FileLock, is_held, try_lock
from ember.machines.store import LEFTOVER_AGE, MachineStore
from ember.oci.digest import Digest
from ember.oci.errors import FormatError
from ember.snapshots import names
from ember.snapshots.chain import machine_key
from ember.snapshots.errors import RootsUnreadable, SnapshotInUse, SnapshotNotFound
from ember.snapshots.fiemap import exclusive_bytes, physical_extents
from ember.snapshots.leases import Lease
from ember.snapshots.model import Kind, SnapshotInfo
from ember.snapshots.snapshotter import LOCK, Snapshotter
from ember.store.content import ContentStore
from ember.store.errors import StoreError
from ember.volumes.spec import KEY_PREFIX as VOLUME

log = logging.getLogger("ember.snapshots")

#: unreferenced blobs younger than this are kept (0: the image-service lock already keeps
#: gc away from pulls in progress)
DEFAULT_CONTENT_GRACE = 0.0
#: partial downloads untouched for this long are dropped (younger ones may be resumed)
INGEST_GRACE = 3600.0


@dataclass
class GCReport:
    snapshots: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    ingests: int = 0  # stale partial downloads
    ingest_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # unreferenced but in use
    #: free space the pool gained (a dry run: what the snapshots it lists hold alone)
    snapshot_bytes: int = 0
    content_bytes: int = 0
    #: machine templates (ember.vm.template) unused for long or built from old inputs
    templates: list[str] = field(default_factory=list)
    template_bytes: int = 0
    #: leftovers of commands killed half-way (``sweep_leftovers``): machine directories
    #: (``.removing-<id>``, and ``<id>`` without a record) and atomic_write temp files
    machine_dirs: int = 0
    temp_files: int = 0
    #: guest kernels no machine boots: Debian versions no longer the default, and ELFs
    #: extracted from a user's bzImage (``ember.vm.kernel.unused_kernels``)
    kernels: list[str] = field(default_factory=list)
    kernel_bytes: int = 0
    #: work directories of a KVM probe, a kernel install or a template build
    work_dirs: int = 0
    #: network allocations of machines that no longer exist (``free_orphaned_networks``)
    networks: list[str] = field(default_factory=list)
    leftover_bytes: int = 0
    dry_run: bool = False
    #: what a person should know (damaged snapshots kept, and what they keep)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "snapshots": self.snapshots,
            "content": self.content,
            "leases": self.leases,
            "ingests": self.ingests,
            "ingest_bytes": self.ingest_bytes,
            "skipped": self.skipped,
            "snapshot_bytes": self.snapshot_bytes,
            "content_bytes": self.content_bytes,
            "templates": self.templates,
            "template_bytes": self.template_bytes,
            "kernels": self.kernels,
            "kernel_bytes": self.kernel_bytes,
            "machine_dirs": self.machine_dirs,
            "temp_files": self.temp_files,
            "work_dirs": self.work_dirs,
            "networks": self.networks,
            "leftover_bytes": self.leftover_bytes,
            "warnings": self.warnings,
        }


@dataclass
class Roots:
    snapshots: set[str] = field(default_factory=set)
    content: set[Digest] = field(default_factory=set)


def image_roots(home: Home) -> Roots:
    """What the images in the image table need."""
    from ember.images import ImageError, ImageService  # only GC needs the image service

    roots = Roots()
    service = ImageService(home)
    for record in service.list():
        roots.content.add(record.manifest_digest)
        roots.content.add(record.config_digest)
        if record.index_digest is not None:
            roots.content.add(record.index_digest)
        try:
            image = service.get(record.reference)
        except (ImageError, StoreError, FormatError) as e:
            # a damaged record must not make GC delete its layers blindly
            raise RootsUnreadable(
                f"cannot read image {record.reference} ({e}); gc stopped, nothing removed"
            ) from e
        roots.content.update(layer.digest for layer in image.layers)
        # every layer's, not only the top's (which reaches the rest): a prepare that
        # failed keeps the layers it finished for the next one to build on
        roots.snapshots.update(str(layer.chain_id) for layer in image.layers)
    return roots


def collect(
    home: Home,
    *,
    dry_run: bool = False,
    content_grace: float = DEFAULT_CONTENT_GRACE,
    ingest_grace: float = INGEST_GRACE,
    snapshotter: Snapshotter | None = None,
    roots: Roots | None = None,
    templates_unused_for: float | None = None,
    leftover_grace: float = LEFTOVER_AGE,
    notice: Callable[[str], None] | None = None,
) -> GCReport:
    """Mark from images, live leases and claims, sweep snapshots, blobs and expired leases;
    also drop machine templates no machine started from for ``templates_unused_for``
    seconds (default ``ember.vm.template.UNUSED_FOR``: a week) or built from inputs since
    replaced, and what killed commands left for ``leftover_grace`` seconds
    (``sweep_leftovers``).  ``notice``: told (one line) when another command holds a lock
    gc waits for."""
    from ember.images.locking import Claims, images_lock
    from ember.vm import template  # a cache of its own, outside the mark-and-sweep

    # No pool yet: no snapshots and no leases, only content to sweep (a pool is not set
    # up just to find that out).
    snap = snapshotter or Snapshotter.existing(home)
    report = GCReport(dry_run=dry_run)
    # The image service holds images.lock shared while it pulls: holding it exclusive
    # from reading the roots to the end of the sweep means no pull is writing blobs it
    # has not recorded yet.  Commands using a local image (an unpack) claim its blobs
    # instead (ember.images.locking): frozen claims are roots too, and no new claim is
    # made meanwhile (one made after finds its blobs gone and fetches them again).
    # Order: images.lock, gc.lock, claims.lock.
    # Partial downloads no pull is writing (their writer's lock is free), first: they
    # need no database and no lock of ours, and after a full disk (the database cannot
    # even be opened then) dropping them is what makes room.
    report.ingests, report.ingest_bytes = ContentStore(home.content).stale_ingests(
        older_than=ingest_grace, remove=not dry_run
    )
    # the same for the leftovers of killed commands: each is known stale by its age and
    # its own locks
    sweep_leftovers(home, report, leftover_grace, dry_run=dry_run)
    _sweep_kernels(home, report, leftover_grace, dry_run=dry_run)
    with contextlib.ExitStack() as held:
        # a dry run changes nothing: it reads beside running pulls instead of waiting
        held.enter_context(images_lock(home, exclusive=not dry_run, notice=notice))
        if snap is not None:
            held.enter_context(FileLock(snap.gc_lock))
        claimed = held.enter_context(Claims(home, notice).frozen())
        now = time.time()
        if roots is None:
            roots = image_roots(home)
        roots.content.update(claimed)
        # A machine's record keeps its root disk, as a container record does in
        # containerd: its lease alone did, and a lease removed with --force (or lost)
        # let gc delete the disk of a running machine under its VMM.
        machines = set(MachineStore(home).ids())
        roots.snapshots.update(machine_key(m) for m in machines)
        if snap is not None:
            # A volume stays until `ember volume rm` (which checks that no machine names
            # it): its lease alone did, and a lease removed (or lost) let gc delete what a
            # machine had written there, and its next start made an empty one.
            roots.snapshots.update(s.name for s in snap.list() if s.name.startswith(VOLUME))
            _mark_leases(snap, roots, report, dry_run, now, machines, leftover_grace)
            _sweep_snapshots(snap, roots, report, dry_run)
        _sweep_blobs(ContentStore(home.content), roots, report, dry_run, content_grace, now)
    age = template.UNUSED_FOR if templates_unused_for is None else templates_unused_for
    for key, size in template.prune_unused(home, age, dry_run=dry_run):
        report.templates.append(key)
        report.template_bytes += size
    return report


def _sweep_kernels(home: Home, report: GCReport, older_than: float, *, dry_run: bool) -> None:
    """Remove (count, in a dry run) the guest kernels no machine boots any more
    (``unused_kernels``); none while an install runs (its lock) or while a machine's
    record cannot be read (which kernel it boots is unknown)."""
    from ember.vm.initramfs import remove_archive, unused_archives
    from ember.vm.kernel import dir_version, unused_kernels

    if not home.kernels.is_dir() or home.kernels.is_symlink():
        return
    machines, damaged = MachineStore(home).scan()
    if damaged:
        report.warnings.append(
            f"kept the kernels no machine seems to boot: the record of machine "
            f"{damaged[0].machine_id[:12]} cannot be read"
        )
        return
    lock = try_lock(home.kernel_install_lock)
    if lock is None:
        return  # an install is under way: it may be making the next default
    try:
        for d in unused_kernels(home, [m.vm.kernel for m in machines], older_than):
            size = tree_bytes(d)
            if not dry_run:
                try:
                    remove_tree(d)
                except OSError as e:
                    log.warning("gc: cannot remove kernel %s: %s", d, e)
                    continue
            report.kernels.append(d.name if d.parent == home.kernels else f"custom/{d.name}")
            report.kernel_bytes += size
            # its cached base initramfs archives (a few MB each) go with it, those made
            # over an hour ago (a custom kernel may share the version's name): machines
            # made with one hold their own link
            version = dir_version(home, d)
            for archive in unused_archives(home, version) if version is not None else []:
                with contextlib.suppress(FileNotFoundError):
                    report.kernel_bytes += archive.stat().st_size
                    if not dry_run:
                        remove_archive(archive)
    finally:
        lock.release()


def sweep_leftovers(home: Home, report: GCReport, older_than: float, *, dry_run: bool) -> None:
    """Remove (count, in a dry run) what commands killed half-way (SIGKILL) left and no
    other command removes, untouched for ``older_than`` seconds: the machine directories
    of an ``ember rm`` or ``ember run`` cut short (``MachineStore.sweep``), and the temp
    files of ``atomic_write`` (``fsutil.stale_temps``) in the machines' directories,
    ``snapshots/leases/``, ``snapshots/`` (pool.json), ``net/`` and the state directory
    itself (config.json, credentials.json, accel.json).  None is ever read in place of
    the file it was to become: this is for disk space only."""
    swept = MachineStore(home).sweep(older_than, remove=not dry_run)
    report.machine_dirs += swept.dirs
    report.temp_files += swept.temp_files
    report.leftover_bytes += swept.bytes
    # the state directory and snapshots/ may be symlinks of their owner's choosing (the
    # pool follows snapshots/); the directories ember makes inside them never are
    for directory, follow in (
        (home.root, True),
        (home.snapshots, True),
        (home.snapshots / "leases", False),
        (home.net_state.parent, False),
    ):
        count, size = stale_temps(directory, older_than, remove=not dry_run, follow=follow)
        report.temp_files += count
        report.leftover_bytes += size
    _sweep_vm_leftovers(home, report, older_than, dry_run=dry_run)
    if home.net_state.exists():  # (no machine ever had a network here: nothing to load)
        from ember.machines.lifecycle import free_orphaned_networks

        try:
            report.networks = [m[:12] for m in free_orphaned_networks(home, dry_run=dry_run)]
        except EmberError as e:  # (the rest of the sweep is done: say it, go on)
            report.warnings.append(f"cannot free the networks of removed machines: {e}")


def _sweep_vm_leftovers(home: Home, report: GCReport, older_than: float, *, dry_run: bool) -> None:
    """What the VM side's killed runs leave (``sweep_leftovers``): the temp files of
    ``atomic_write`` in ``kernels/`` (the default kernel), ``kernels/custom/<sha256>/``
    (a vmlinux extracted from a user's bzImage) and ``kernels/templates/`` (a template's
    shape); and work directories, each only while nothing can be using it: a KVM probe's
    (``run/accel-probe-*``: a probe ends within seconds), a kernel install's
    (``kernels/.install-*``, while no install holds its lock) and a template build's
    (``kernels/templates/.build-<key>-*``, while no builder holds that shape's lock)."""
    from ember.vm import template

    def count(found: tuple[int, int]) -> None:
        report.temp_files += found[0]
        report.leftover_bytes += found[1]

    def count_dirs(found: tuple[int, int]) -> None:
        report.work_dirs += found[0]
        report.leftover_bytes += found[1]

    # kernels/ may be shared between state directories by their owner (a symlink)
    count(stale_temps(home.kernels, older_than, remove=not dry_run, follow=True))
    count(stale_temps(home.templates, older_than, remove=not dry_run))
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(home.custom_kernels):
            if entry.is_dir(follow_symlinks=False):
                count(stale_temps(Path(entry.path), older_than, remove=not dry_run))

    def probe_ended(_name: str) -> bool:
        return True

    def no_install(_name: str) -> bool:
        return not is_held(home.kernel_install_lock)

    for directory, prefix, unused in (
        (home.run, "accel-probe-", probe_ended),
        (home.kernels, ".install-", no_install),
    ):
        count_dirs(stale_work_dirs(directory, prefix, older_than, unused, remove=not dry_run))
    count_dirs(template.stale_build_dirs(home.templates, older_than, remove=not dry_run))


def _mark_leases(
    snap: Snapshotter, roots: Roots, report: GCReport, dry_run: bool, now: float,
    machines: set[str], leftover_grace: float,
) -> None:
    """Add what live leases hold to ``roots``; drop expired leases, and the leases of
    machines that are gone (``_machine_gone``; ``machines``: the ids that have a
    directory)."""
    for lease in snap.leases.list():
        if lease.expired(now) or _machine_gone(lease, machines, now, leftover_grace):
            report.leases.append(lease.name)
            if not dry_run:
                # direct unlink: Leases.delete would wait for the lock we hold
                (snap.pool.leases / f"{names.encode(lease.name, 'lease name')}.json").unlink(
                    missing_ok=True
                )
        else:
            roots.snapshots.update(lease.snapshots)
            for text in lease.content:
                with contextlib.suppress(FormatError):  # names no blob: protects none
                    roots.content.add(Digest.parse(text))


def _machine_gone(lease: Lease, machines: set[str], now: float, grace: float) -> bool:
    """A machine's lease (``machine/<id>``, made as its run begins) whose machine has
    no directory, for ``grace`` seconds: an `ember run` killed during its pull left
    it, and it kept the image's whole chain for good (its directory, without a
    record, is swept as a leftover)."""
    machine_id = lease.labels.get("machine")
    return (
        machine_id is not None
        and lease.name == f"machine/{machine_id}"
        and machine_id not in machines
        and now - lease.created >= grace
    )


def _sweep_snapshots(snap: Snapshotter, roots: Roots, report: GCReport, dry_run: bool) -> None:
    infos = {s.name: s for s in snap.list()}
    marked: set[str] = set()

    def mark(name: str | None) -> None:
        while name is not None and name not in marked and name in infos:
            marked.add(name)
            name = infos[name].parent

    for name in roots.snapshots:
        mark(name)
    # A damaged snapshot is kept, for a person to look at (or for prepare to build again),
    # and so are its parents.  When its metadata cannot be read, which snapshots are its
    # parents is unknown: then no committed snapshot is removed.
    damaged = sorted(n for n, info in infos.items() if info.damaged)
    for name in damaged:
        mark(name)
        report.warnings.append(
            f"kept damaged snapshot {name}: {infos[name].damaged} "
            "(ember snapshot rm removes it; ember image prepare builds a layer again)"
        )
    unreadable = [n for n in damaged if infos[n].unreadable]

    # children before parents: actives first, then committed by depth, deepest first
    def depth(name: str) -> int:
        d, seen = 0, set()
        while (p := infos[name].parent) is not None and p in infos and p not in seen:
            seen.add(p)
            name, d = p, d + 1
        return d

    victims = [n for n in infos if n not in marked]
    if unreadable:
        kept = [n for n in victims if infos[n].kind is Kind.COMMITTED]
        victims = [n for n in victims if infos[n].kind is not Kind.COMMITTED]
        if kept:
            report.warnings.append(
                f"kept {len(kept)} unreferenced committed snapshot(s): the metadata of "
                f"{', '.join(unreadable)} cannot be read, so which of them are its parents "
                "is unknown"
            )
    victims.sort(key=lambda n: (infos[n].kind is Kind.COMMITTED, -depth(n)))
    if dry_run:
        going = _would_remove(infos, victims, report)
        report.snapshot_bytes = _bytes_freed_by(snap, [infos[n].path for n in going])
        return
    before = _settled_free(snap.pool.root)
    for name in victims:
        try:
            snap.remove(name)
            report.snapshots.append(name)
        except SnapshotNotFound:
            continue
        except SnapshotInUse as e:
            report.skipped.append(name)
            log.info("gc: keeping %s: %s", name, e)
    report.snapshot_bytes = max(_settled_free(snap.pool.root) - before, 0)


def _would_remove(
    infos: dict[str, SnapshotInfo], victims: list[str], report: GCReport
) -> list[str]:
    """What removing ``victims`` (children first) would remove, nothing changed: one whose
    lock a process holds (being built, mounted) is skipped, and so is the parent of a
    snapshot that stays."""
    children: dict[str, list[str]] = {}
    for child, info in infos.items():
        if info.parent is not None:
            children.setdefault(info.parent, []).append(child)
    going: set[str] = set()
    for name in victims:
        lock = try_lock(infos[name].path.parent / LOCK)
        if lock is None:
            report.skipped.append(name)
            continue
        lock.release()
        if any(child not in going for child in children.get(name, ())):
            report.skipped.append(name)
            continue
        going.add(name)
        report.snapshots.append(name)
    return [n for n in victims if n in going]


def _bytes_freed_by(snap: Snapshotter, disks: list[Path]) -> int:
    """What deleting ``disks`` would give back to the pool: the physical extents they
    hold that no other file in the pool shares (FIEMAP).  Reflinked extents make a sum
    of file sizes or ``st_blocks`` count shared blocks once per file; a chain of layers
    shares most of its blocks among its own disks, which all go together."""
    if not disks:
        return 0
    going = {os.path.realpath(p) for p in disks}
    gone: list[tuple[int, int]] = []
    kept: list[tuple[int, int]] = []
    for top, dirs, files in os.walk(snap.pool.root):
        if os.path.realpath(top) == os.path.realpath(snap.trash):
            dirs[:] = []  # being deleted
            continue
        for name in files:
            path = os.path.realpath(os.path.join(top, name))
            try:
                extents = physical_extents(Path(path))
            except OSError:
                continue  # gone meanwhile, or no FIEMAP
            (gone if path in going else kept).extend(extents)
    return exclusive_bytes(gone, kept)


#: XFS_IOC_FREE_EOFBLOCKS, _IOR('X', 58, struct xfs_fs_eofblocks): 128 bytes, version 1,
#: flags XFS_EOF_FLAGS_MINFILESIZE with a minimum no file reaches: it trims no file's
#: preallocation, and still waits for the background frees (see _settled_free)
_XFS_IOC_FREE_EOFBLOCKS = 0x8080583A
_EOFBLOCKS_ARG = struct.pack("=IIIIIIQ96x", 1, 1 << 4, 0, 0, 0, 0, (1 << 63) - 1)


def _settled_free(root: Path) -> int:
    """The pool's free bytes once the blocks of the files deleted so far are free.

    statvfs counts a block shared by reflinks once, so the difference of two
    readings is what a sweep freed.  But XFS (since Linux 5.19) frees the
    blocks of an unlinked file in the background (inodegc): right after a
    sweep, statvfs does not show them yet, and sync(2) and syncfs(2) do not
    wait for that work.  Measured on 6.18 with a 200 MiB file: 0 freed after
    unlink + sync, 200 MiB a few milliseconds later.  XFS_IOC_FREE_EOFBLOCKS
    ends by flushing that background work synchronously
    (xfs_blockgc_free_space -> xfs_inodegc_flush): after it, statvfs is right
    (200 MiB, in 0.2 ms).  Its own job, trimming speculative preallocation
    past the end of files, is given a filter no file passes, so it changes
    nothing that would be counted as freed.  On another file system (a native
    pool on btrfs) the ioctl fails, and sync(2) commits the transaction that
    frees the extents (measured: right after it).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.ioctl(fd, _XFS_IOC_FREE_EOFBLOCKS, _EOFBLOCKS_ARG)
        except OSError:  # not XFS
            os.sync()
        st = os.fstatvfs(fd)
        return st.f_bavail * st.f_frsize
    finally:
        os.close(fd)


def _sweep_blobs(
    store: ContentStore, roots: Roots, report: GCReport, dry_run: bool, grace: float, now: float
) -> None:
    for digest in list(store.list()):
        if digest in roots.content:
            continue
        path = store.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if now - st.st_mtime < grace:
            report.skipped.append(str(digest))
            continue
        report.content.append(str(digest))
        report.content_bytes += st.st_size
        if not dry_run:
            store.delete(digest)
