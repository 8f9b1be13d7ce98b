"""The snapshotter (containerd's vocabulary): prepare, view, commit, remove, list, usage.

Layout of the pool (see pool.py for where it is)::

    committed/<key>/disk.ext4   immutable ext4 image (mode 0444), named by chain ID for layers
    committed/<key>/meta.json   parent, creation time, labels
    active/<key>/...            the same for writable (and view) snapshots
    active/.new-*/              a snapshot being created: renamed into place when complete
    trash/*                     removed snapshots, deleted after an atomic rename
    bases/empty-<size>-<opts>.ext4  cached empty disks, cloned for new base layers (reflink)

``<key>`` is the percent-encoded key (names.py).  Every state change is one
rename inside the pool's file system, so a kill -9 leaves each snapshot either
absent, active or committed, never half of one.  Each snapshot directory has a
``lock`` file: a process building or mounting the snapshot holds an flock on
it; a free lock on a transient (builder's) snapshot means its builder died, and
``recover`` discards it.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from ember.fsutil import atomic_write, fsync_dir, fsync_file
from ember.home import Home
from ember.locks import FileLock, Notice, try_lock
from ember.sizes import human_size
from ember.snapshots import interrupts, names, superblock, system
from ember.snapshots.config import SnapshotConfig, disk_size_problem
from ember.snapshots.errors import (
    AmbiguousName,
    CheckFailed,
    CommandFailed,
    InvalidDiskSize,
    PoolError,
    SnapshotError,
    SnapshotExists,
    SnapshotInUse,
    SnapshotNotFound,
)
from ember.snapshots.fiemap import file_usage
from ember.snapshots.leases import Leases
from ember.snapshots.model import ActiveSnapshot, Kind, Meta, Mount, SnapshotInfo, Usage
from ember.snapshots.pool import Pool, open_pool, pool_exists, private_dir

log = logging.getLogger("ember.snapshots")

#: taken by ``recover`` (exclusive) and by every ``mount`` (shared), in the pool's locks
RECOVER_LOCK = "recover.lock"


def _real_dir(d: Path) -> bool:
    """A directory, not a symlink to one: a snapshot is never a symlink, and one in its
    place (no snapshot of ember's, see ``_stray``) must not lead ember out of the pool."""
    return not d.is_symlink() and d.is_dir()


def _stray(d: Path) -> bool:
    """``d`` (in committed/ or active/) is no snapshot ember made: not a directory, or a
    name that is no encoded key.  Said once, and left alone: one such entry made every
    command that opens the store fail, or `snapshot ls` and gc.  An entry that is gone
    (since the listing its caller made) is skipped too, unsaid."""
    try:
        name_ok = names.encode(names.decode(d.name)) == d.name
    except SnapshotError:
        name_ok = False
    if name_ok and _real_dir(d):
        return False
    try:
        os.lstat(d)
    except FileNotFoundError:
        # gone since the listing: a commit renamed a build away (active/build%2F... is
        # committed/<chain id> now), a removal; it was said to be a foreign entry
        return True
    if d not in _SAID_STRAY:
        _SAID_STRAY.add(d)
        log.warning("%s is no snapshot of ember's (left alone; remove it if nothing uses it)", d)
    return True


_SAID_STRAY: set[Path] = set()

DISK = "disk.ext4"
META = "meta.json"
LOCK = "lock"
#: unmount attempts recovery makes of a leftover mount before it detaches it lazily
#: (~1 s of waiting in all; ``system.unmount``)
RECOVERY_UNMOUNT_ATTEMPTS = 6
CHECKED = "checked"  # present when the disk passed e2fsck -fn (committed disks never change)
_CHECKED_MARK = b"e2fsck -fn\n"

# recovery runs once per process per pool
_recovered: set[Path] = set()


class Snapshotter:
    def __init__(
        self, home: Home, config: SnapshotConfig | None = None, *, recover: bool = True
    ) -> None:
        self.home = home.ensure()
        self.config = config or SnapshotConfig.load(home)
        self.pool: Pool = open_pool(self.home, self.config)
        root = self.pool.root
        self.active_dir, self.committed_dir, self.trash = (
            root / "active",
            root / "committed",
            root / "trash",
        )
        self.bases = root / "bases"  # cached empty disks (see _new_base)
        for d in (self.active_dir, self.committed_dir, self.trash, self.bases):
            private_dir(d)
        self.gc_lock = self.pool.locks / "gc.lock"
        self.leases = Leases(self.pool.leases, self.gc_lock)
        if recover and root not in _recovered:
            self.recover()
            _recovered.add(root)
        if self.pool.created and self.pool.backend.name == "reflink":
            self._empty_base(self.config.base_size)  # part of setting the pool up, once

    @classmethod
    def existing(cls, home: Home) -> Snapshotter | None:
        """The snapshotter of ``home``'s pool, or None when no pool was ever set up there
        (nothing is created to find out)."""
        return cls(home) if pool_exists(home) else None

    # -- lookup ------------------------------------------------------------------------------

    def _locate(self, key: str) -> tuple[Path, Kind]:
        """The directory of a snapshot and its kind.  A snapshot whose metadata is damaged is
        found too (``remove`` must reach it); what needs its metadata fails on it clearly."""
        enc = names.encode(key)
        d = self.committed_dir / enc
        if _real_dir(d):
            return d, Kind.COMMITTED
        d = self.active_dir / enc
        if _real_dir(d):
            try:
                return d, (Kind.VIEW if self._meta(d).kind is Kind.VIEW else Kind.ACTIVE)
            except (FileNotFoundError, SnapshotError):
                return d, Kind.ACTIVE
        raise SnapshotNotFound(f"no snapshot {key!r}")

    def _meta(self, d: Path) -> Meta:
        """The metadata in ``d``: FileNotFoundError when it is missing (or ``d`` gone), else
        SnapshotError when it cannot be used, read or not."""
        path = d / META
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            # EIO, EISDIR, ELOOP: damage like a file that holds no metadata.  Raised raw, it
            # failed prepare, ls, gc and rm (which lists the snapshots to find children), and
            # nothing could remove the snapshot.
            raise SnapshotError(f"snapshot metadata {path} cannot be read: {e.strerror}") from e
        return Meta.load(data, path)

    def exists(self, key: str) -> bool:
        try:
            self._locate(key)
            return True
        except SnapshotNotFound:
            return False

    def is_committed(self, key: str) -> bool:
        """Is ``key`` committed and usable?  One whose metadata is damaged or whose disk is
        missing is not: ``prepare_image`` builds it again (``replace_damaged``)."""
        d = self.committed_dir / names.encode(key)
        try:
            return _real_dir(d) and self._damage(d, Kind.COMMITTED) is None
        except FileNotFoundError:
            return False  # removed since the look (gc, snapshot rm)

    def _damage(self, d: Path, kind: Kind) -> str | None:
        """Why the snapshot in ``d`` is unusable, or None.  FileNotFoundError when it is gone."""
        try:
            meta = self._meta(d)
        except FileNotFoundError:
            if not d.is_dir():
                raise
            return f"its metadata {d / META} is missing"
        except SnapshotError as e:
            return str(e)
        if kind is Kind.COMMITTED:
            wrong = meta.kind is not Kind.COMMITTED or meta.key != names.decode(d.name)
        else:  # metadata that says committed (under the new name): a commit in flight
            wrong = meta.kind is not Kind.COMMITTED and meta.key != names.decode(d.name)
        if wrong:
            return f"its metadata {d / META} describes another snapshot"
        if not (d / DISK).is_file():
            return f"its disk {d / DISK} is missing"
        if kind is Kind.COMMITTED:
            # one pread: a disk truncated or overwritten since its commit (0.3 ms)
            try:
                found = superblock.check_image(d / DISK)
            except OSError as e:
                return f"its disk {d / DISK} cannot be read ({e.strerror})"
            if found:
                return f"its disk {d / DISK} is damaged: {'; '.join(found)}"
        return None

    def replace_damaged(self, key: str) -> bool:
        """Remove committed ``key`` if it is damaged (``is_committed`` is False, yet it is
        there), so that it can be built again under its name; True if it was.

        Its children stay: each is a complete disk of its own (a clone, not a
        reference to this one), and the rebuilt snapshot has the same content (a
        chain ID names it).  SnapshotInUse when a process holds it (mounted)."""
        d = self.committed_dir / names.encode(key)
        try:
            damage = self._damage(d, Kind.COMMITTED)
        except FileNotFoundError:
            return False
        if damage is None:
            return False
        lock = _require_lock(d / LOCK, f"damaged snapshot {key!r}")
        try:
            if not d.is_dir():
                return False
            log.warning("snapshot %s is damaged (%s): building it again", key, damage)
            self._discard(d)
        finally:
            lock.release()
        return True

    def resolve(self, name: str) -> str:
        """The snapshot key ``name`` means, as a person types it: the key itself, or, as
        docker takes short IDs, the one snapshot whose digest name starts with it
        (``sha256:5234507c3472``, as ``ember snapshot ls`` prints it, or ``5234507c3472``).
        SnapshotNotFound when none matches; AmbiguousName when several do."""
        if self.exists(name):
            return name
        hexpart = name.removeprefix("sha256:")
        if not hexpart or any(c not in "0123456789abcdef" for c in hexpart):
            raise SnapshotNotFound(f"no snapshot {name!r}")
        prefix = "sha256:" + hexpart
        found = sorted(
            {
                key
                for tree in (self.committed_dir, self.active_dir)
                for entry in os.listdir(tree)
                if not entry.startswith(".") and (key := names.decode(entry)).startswith(prefix)
            }
        )
        if not found:
            raise SnapshotNotFound(f"no snapshot {name!r}")
        if len(found) > 1:
            shown = ", ".join(k[:19] for k in found[:3]) + (", ..." if len(found) > 3 else "")
            raise AmbiguousName(
                f"{name!r} matches {len(found)} snapshots ({shown})",
                hint="give more of the name",
            )
        return found[0]

    def _info(self, d: Path, kind: Kind) -> SnapshotInfo:
        try:
            meta = self._meta(d)
        except (FileNotFoundError, SnapshotError):
            damage = self._damage(d, kind)  # FileNotFoundError: removed while we looked
            return SnapshotInfo(
                name=names.decode(d.name), kind=kind, parent=None, created=_mtime(d), size=0,
                path=d / DISK, damaged=damage, unreadable=True,
            )  # fmt: skip
        try:
            size = system.fs_size(d / DISK)
        except (OSError, SnapshotError):
            size = 0
        return SnapshotInfo(
            name=names.decode(d.name),
            kind=kind
            if kind is Kind.COMMITTED
            else (Kind.VIEW if meta.kind is Kind.VIEW else Kind.ACTIVE),
            parent=meta.parent,
            created=meta.created,
            size=size,
            path=d / DISK,
            labels=meta.labels,
            transient=meta.transient,
            damaged=self._damage(d, kind),
        )

    def stat(self, key: str) -> SnapshotInfo:
        d, kind = self._locate(key)
        return self._info(d, kind)

    def set_labels(self, key: str, changes: Mapping[str, str | None]) -> None:
        """Change an active snapshot's labels (None removes one), in one atomic write of
        its metadata.  The caller serializes its own changes (a volume's lock)."""
        d, kind = self._locate(key)
        if kind is not Kind.ACTIVE:
            raise SnapshotError(f"snapshot {key!r} is {kind.value}: only an active one's labels change")
        meta = self._meta(d)
        labels = dict(meta.labels)
        for name, value in changes.items():
            if value is None:
                labels.pop(name, None)
            else:
                labels[name] = value
        atomic_write(d / META, dataclasses.replace(meta, labels=labels).dump())

    def path(self, key: str) -> Path:
        """The disk image of a snapshot."""
        return self._locate(key)[0] / DISK

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot, damaged ones too (``damaged`` says why; their parent is unknown
        when their metadata is what is damaged)."""
        found: dict[Kind, list[SnapshotInfo]] = {}
        # active/ first: a commit moves a build from there to committed/, so one that
        # commits meanwhile is seen (in one or both); the other order missed it (in
        # neither listing), and a removal looking for children could miss a child
        for tree, kind in ((self.active_dir, Kind.ACTIVE), (self.committed_dir, Kind.COMMITTED)):
            found[kind] = []
            for entry in sorted(os.listdir(tree)):
                if entry.startswith(".") or _stray(tree / entry):
                    continue
                try:
                    found[kind].append(self._info(tree / entry, kind))
                except FileNotFoundError:
                    continue  # removed (or committed) while we looked
        return found[Kind.COMMITTED] + found[Kind.ACTIVE]

    def usage(self, key: str) -> Usage:
        u = file_usage(self.path(key))
        return Usage(size=u.allocated, exclusive=u.exclusive, apparent=u.apparent)

    def mounts(self, key: str) -> builtins.list[Mount]:
        d, kind = self._locate(key)
        ro = kind is not Kind.ACTIVE
        return [Mount("ext4", d / DISK, ("loop", "ro", "noload") if ro else ("loop", "rw"))]

    # -- creating ----------------------------------------------------------------------------

    def prepare(
        self,
        key: str,
        parent: str | None = None,
        *,
        size: int | None = None,
        lease: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> ActiveSnapshot:
        """A writable snapshot: a clone of committed ``parent`` (or an empty ext4), grown to ``size``."""
        snap, lock = self._create(key, parent, Kind.ACTIVE, size, lease, labels, transient=False)
        lock.release()
        return snap

    def view(self, key: str, parent: str, *, lease: str | None = None) -> ActiveSnapshot:
        """A read-only active snapshot of committed ``parent``."""
        snap, lock = self._create(key, parent, Kind.VIEW, None, lease, None, transient=False)
        lock.release()
        return snap

    def prepare_held(
        self,
        key: str,
        parent: str | None,
        *,
        size: int | None = None,
        lease: str | None = None,
        source: str | None = None,
    ) -> tuple[ActiveSnapshot, FileLock]:
        """Like prepare, for a builder: the snapshot is transient and its lock stays held.

        Releasing the lock without committing marks it abandoned; ``recover`` and
        ``gc`` then discard it.  ``source``: clone the disk of that active
        snapshot, which the caller holds, unmounted and complete, and commits as
        ``parent`` before it commits this one (a chain builder commits a layer
        while it builds the next).
        """
        return self._create(
            key, parent, Kind.ACTIVE, size, lease, None, transient=True, source=source
        )

    def _create(
        self,
        key: str,
        parent: str | None,
        kind: Kind,
        size: int | None,
        lease: str | None,
        labels: dict[str, str] | None,
        *,
        transient: bool,
        source: str | None = None,
    ) -> tuple[ActiveSnapshot, FileLock]:
        enc = names.encode(key)
        if parent is not None:
            names.validate_key(parent, "parent")
        if size is not None and (problem := disk_size_problem(size)) is not None:
            raise InvalidDiskSize(f"disk size {human_size(size)} {problem}")
        if self.exists(key):
            raise SnapshotExists(f"snapshot {key!r} already exists")
        self._check_host_space()
        staging = self.active_dir / f".new-{secrets.token_hex(8)}"
        staging.mkdir()
        lock = FileLock(staging / LOCK)
        lock.acquire()
        try:
            meta = Meta(key, kind, parent, time.time(), dict(labels or {}), transient)
            if transient:
                # a builder's snapshot is discarded after any crash: durability buys nothing
                (staging / META).write_bytes(meta.dump())
            else:
                atomic_write(staging / META, meta.dump())
            disk = staging / DISK
            if source is not None:
                self._clone_source(source, disk)
            elif parent is None:
                self._new_base(disk, size or self.config.base_size)
            else:
                self._clone_parent(parent, disk)
                if size is not None and size != (current := system.fs_size(disk)):
                    if size < current and size < (least := system.min_ext4_size(disk)):
                        # resize2fs' own last words ("after the aborted resize operation")
                        # said nothing of why
                        raise InvalidDiskSize(
                            f"disk size {human_size(size)} is too small for this image: its "
                            f"file system needs at least {human_size(least)}"
                        )
                    system.resize_ext4(disk, size)
            if kind is Kind.VIEW:
                os.chmod(disk, 0o444)
            if not transient:
                # A machine's disk outlives a host crash: its blocks (the copy backend's
                # writes, a resize) or its extent map (a reflink) must be on disk before
                # its name is, like every other file ember publishes.
                fsync_file(disk)
            if lease is not None:
                self.leases.add(lease, snapshots=[key])
            target = self.active_dir / enc
            try:
                os.rename(staging, target)
            except OSError as e:
                raise SnapshotExists(f"snapshot {key!r} already exists") from e
            if not transient:
                fsync_dir(self.active_dir)
        except BaseException:
            lock.release()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ActiveSnapshot(key, kind, parent, target / DISK), lock

    def _check_host_space(self) -> None:
        """Refuse a new disk when the file system under a pool file is nearly full.

        The pool file is thin: XFS inside it believes it has its whole size, and a
        block the host cannot place is an I/O error that shuts the pool down, every
        machine's disk with it.  ENOSPC from ember before that is the lesser evil.
        (A native pool fails with ENOSPC by itself.)  It guards new work only: a
        running machine that writes still fills the host."""
        image, reserve = self.pool.image, self.config.host_reserve
        if image is None or reserve <= 0:
            return
        under = Path(os.path.realpath(image)).parent  # (a pool file moved and symlinked back)
        st = os.statvfs(under)
        free = st.f_bavail * st.f_frsize
        if free < reserve:
            raise PoolError(
                f"the file system under the snapshot pool ({under}) has "
                f"{free >> 20} MiB free, less than the {reserve >> 20} MiB ember keeps "
                "there (snapshots.host_reserve): the pool file would grow into a full disk",
                hint="free space on that file system, or remove images and machines "
                "and run ember gc",
            )

    def _new_base(self, disk: Path, size: int) -> None:
        """An empty ext4 of ``size`` bytes at ``disk``.

        With reflinks, a clone of a cached empty disk of that size (``bases/``
        in the pool, made once by mkfs.ext4): ~0.3 ms instead of a mkfs run of
        ~12 ms for every image whose base layer is new.  Like the clones of a
        layer's snapshot, every such disk then carries the same file system UUID.
        """
        backend = self.pool.backend
        if backend.name != "reflink":
            backend.create(disk, size)
            return
        backend.clone(self._empty_base(size), disk)
        os.chmod(disk, 0o600)

    def _empty_base(self, size: int) -> Path:
        """The cached empty disk of ``size`` bytes, made (fsync'ed, then named) if missing or damaged."""
        options = hashlib.sha256(" ".join([*system.MKFS_OPTIONS, system.MKFS_LABEL]).encode())
        cached = self.bases / f"empty-{size}-{options.hexdigest()[:12]}.ext4"
        if cached.is_file() and not superblock.check_image(cached):
            return cached
        tmp = self.bases / f".new-{secrets.token_hex(8)}"
        try:
            self.pool.backend.create(tmp, size)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # complete before its name says so
            finally:
                os.close(fd)
            os.chmod(tmp, 0o444)
            os.replace(tmp, cached)  # a racing builder's equal copy may lose: harmless
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.bases)
        return cached

    def _clone_source(self, source: str, disk: Path) -> None:
        d, kind = self._locate(source)
        if kind is not Kind.ACTIVE or not self._meta(d).transient:
            raise SnapshotError(f"snapshot {source!r} is not a builder's snapshot")
        self.pool.backend.clone(d / DISK, disk)
        os.chmod(disk, 0o600)

    def _clone_parent(self, parent: str, disk: Path) -> None:
        pdir = self.committed_dir / names.encode(parent)
        if not _real_dir(pdir):
            if (self.active_dir / names.encode(parent)).is_dir():
                raise SnapshotError(f"parent {parent!r} is not committed")
            raise SnapshotNotFound(f"parent snapshot {parent!r} does not exist")
        try:
            damage = self._damage(pdir, Kind.COMMITTED)
        except FileNotFoundError:
            raise SnapshotNotFound(f"parent snapshot {parent!r} was removed") from None
        if damage is not None:
            raise SnapshotError(f"parent snapshot {parent!r} is damaged: {damage}")
        # a shared hold keeps ``remove`` (exclusive) away while we read the parent
        try:
            plock = FileLock(pdir / LOCK, shared=True)
            plock.acquire()
        except FileNotFoundError:
            raise SnapshotNotFound(f"parent snapshot {parent!r} was removed") from None
        try:
            if not (pdir / DISK).is_file():
                raise SnapshotNotFound(f"parent snapshot {parent!r} was removed")
            self.pool.backend.clone(pdir / DISK, disk)
        finally:
            plock.release()
        os.chmod(disk, 0o600)

    # -- using -------------------------------------------------------------------------------

    @contextmanager
    def mount(self, key: str, *, held: FileLock | None = None) -> Iterator[Path]:
        """Loop-mount a snapshot (rw if active, else ro); always unmounted and released on exit.

        ``held``: the snapshot's lock the caller already holds (from prepare_held).
        A builder's (transient) snapshot is mounted without write barriers: it is
        discarded after any crash, and ``commit`` fsyncs the whole disk before it
        counts, so per-commit flushes of the image would buy nothing.
        """
        d, kind = self._locate(key)
        readonly = kind is not Kind.ACTIVE
        barrier = readonly or not self._meta(d).transient
        lock = held or _require_lock(d / LOCK, f"snapshot {key!r}", shared=readonly)
        target = self.pool.mnt / secrets.token_hex(8)
        device: system.LoopDevice | None = None
        try:
            # Shared with other mounts, exclusive for ``recover``: it reads the loop
            # devices, then the mounts; one made between its two reads looked like a
            # mount nobody holds, and was unmounted under its builder.
            with FileLock(self.pool.locks / RECOVER_LOCK, shared=True):
                target.mkdir()
                device = system.mount_image(d / DISK, target, readonly=readonly, barrier=barrier)
            yield target
        except BaseException:
            self._release_mount(target, device, failing=True)
            raise
        else:
            self._release_mount(target, device, failing=False)
        finally:
            if held is None:
                lock.release()

    def _release_mount(
        self, target: Path, device: system.LoopDevice | None, *, failing: bool
    ) -> None:
        """Unmount ``target`` (if mounted) and remove it, to the end even when Ctrl-C comes
        meanwhile: the interrupt is raised once this is done.  An interrupt that lands in
        the unmount's wait for a busy mount would otherwise abandon it, and leave the
        mount and its loop device behind.

        ``failing``: an exception is on its way out (an interrupt, a failed apply); a
        failure here then never replaces it: it is logged, and the mount is left for
        ``recover`` (the next ember command), which unmounts what no process holds.
        """
        with interrupts.deferred():
            try:
                if device is not None or system.is_mountpoint(target):
                    system.unmount(target, device=device, remove_mountpoint=True)
                with suppress(FileNotFoundError):
                    target.rmdir()
            except (OSError, SnapshotError) as e:
                if not failing:
                    raise
                log.warning("%s; the next ember command cleans it up", e)

    def check(self, key: str) -> None:
        """``e2fsck -fn`` the snapshot's file system; raises CheckFailed."""
        try:
            system.fsck_readonly(self.path(key))
        except CommandFailed as e:
            raise CheckFailed(f"snapshot {key!r} failed its file system check: {e}") from e

    def check_superblock(self, key: str) -> None:
        """The cheap check (superblock.py): cleanly unmounted, no errors; raises CheckFailed."""
        found = superblock.check_image(self.path(key))
        if found:
            raise CheckFailed(f"snapshot {key!r} failed its superblock check: {'; '.join(found)}")

    def fully_checked(self, key: str) -> bool:
        """Did this (committed, so unchanged since) snapshot pass ``e2fsck -fn``?"""
        try:
            return (self._locate(key)[0] / CHECKED).read_bytes() == _CHECKED_MARK
        except (FileNotFoundError, SnapshotNotFound):
            return False

    def ensure_checked(self, key: str) -> None:
        """``e2fsck -fn`` a committed snapshot unless it passed before; records the pass.

        For a snapshot built as an intermediate layer (superblock-checked only)
        that has become the top of an image.  Raises CheckFailed.
        """
        d, kind = self._locate(key)
        if kind is not Kind.COMMITTED:
            raise SnapshotError(f"snapshot {key!r} is {kind.value}, not committed")
        if self.fully_checked(key):
            return
        with FileLock(d / LOCK, shared=True):  # keeps ``remove`` away meanwhile
            if not (d / META).is_file():
                raise SnapshotNotFound(f"snapshot {key!r} was removed")
            self.check(key)
            atomic_write(d / CHECKED, _CHECKED_MARK)

    def commit(self, name: str, key: str, *, held: FileLock | None = None,
               labels: dict[str, str] | None = None, checked: bool = False) -> SnapshotInfo:  # fmt: skip
        """Make active ``key`` the immutable committed snapshot ``name`` (one atomic rename).

        ``checked``: the caller ran ``check`` (e2fsck -fn) on the disk as it is
        now, under the lock it holds; the commit records that.
        """
        enc = names.encode(name)
        d, kind = self._locate(key)
        if kind is not Kind.ACTIVE:
            raise SnapshotError(
                f"snapshot {key!r} is {kind.value}: only active snapshots can be committed"
            )
        lock = held or _require_lock(d / LOCK, f"snapshot {key!r}")
        try:
            if self._mounted(d):
                raise SnapshotInUse(f"snapshot {key!r} is mounted: unmount it before committing")
            target = self.committed_dir / enc
            if target.exists():
                raise SnapshotExists(f"a committed snapshot {name!r} already exists")
            disk = d / DISK
            fd = os.open(disk, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is durable before the name that promises it is
            finally:
                os.close(fd)
            os.chmod(disk, 0o444)
            if checked:  # before the metadata that makes it committed: never a stale mark
                atomic_write(d / CHECKED, _CHECKED_MARK)
            else:
                (d / CHECKED).unlink(missing_ok=True)
            old = self._meta(d)
            meta = Meta(
                name, Kind.COMMITTED, old.parent, time.time(), {**old.labels, **(labels or {})}
            )
            atomic_write(d / META, meta.dump())
            try:
                os.rename(d, target)
            except OSError as e:
                raise SnapshotExists(f"a committed snapshot {name!r} already exists") from e
            fsync_dir(self.active_dir)
            fsync_dir(self.committed_dir)
        finally:
            if held is None:
                lock.release()
        return self._info(target, Kind.COMMITTED)

    # -- removing ----------------------------------------------------------------------------

    def children(self, name: str) -> builtins.list[str]:
        return [s.name for s in self.list() if s.parent == name]

    def remove(
        self,
        key: str,
        *,
        held: FileLock | None = None,
        respect_leases: bool = False,
        notice: Notice | None = None,
    ) -> None:
        """Remove a snapshot; a committed one only when nothing has it as parent.

        ``respect_leases``: refuse one that a live lease names (a machine's root disk,
        an image being prepared): what a person asks for, unlike the owner of the
        lease releasing its own snapshot.  It holds the GC lock exclusively from the
        look at the leases to the discard (never pass it while holding that lock);
        ``notice`` is told when that waits for ``ember gc``.
        """
        d, kind = self._locate(key)
        with ExitStack() as stack:
            if respect_leases:
                # Exclusive, as gc takes it: every lease change takes it shared, so no
                # lease can name the snapshot between the check below and the discard.
                # A prepare that reuses it made its lease before, or finds it gone after
                # and builds it again; read without it, a lease made in between was
                # missed and the snapshot removed under that prepare.  (Taken before the
                # snapshot's own lock: no snapshot stays locked while gc sweeps.)
                stack.enter_context(FileLock(self.gc_lock, notice=notice))
            self._remove(key, d, kind, held, respect_leases)

    def _remove(
        self, key: str, d: Path, kind: Kind, held: FileLock | None, respect_leases: bool
    ) -> None:
        lock = held or _require_lock(d / LOCK, f"snapshot {key!r}")
        try:
            if not d.is_dir():
                raise SnapshotNotFound(f"no snapshot {key!r}")
            kids = self.children(key) if kind is Kind.COMMITTED else []
            if respect_leases and (holders := self.leased_by(key)):
                raise SnapshotInUse(
                    f"snapshot {key!r} is held by lease {holders[0]!r}"
                    + (f" and {len(holders) - 1} more" if len(holders) > 1 else ""),
                    # --force passes over leases, never over children (below)
                    hint="remove what holds it first (for machine/ID: ember rm ID)"
                    + ("" if kids else ", or pass --force"),
                )
            if kids:
                # never overridden (not by --force either): a snapshot's parent must exist
                raise SnapshotInUse(
                    f"snapshot {key!r} is the parent of {len(kids)} other snapshot(s), e.g. {kids[0]!r}",
                    hint="remove those first; ember gc removes what no image needs",
                )
            if self._mounted(d):
                raise SnapshotInUse(f"snapshot {key!r} is mounted")
            self._discard(d)
        finally:
            if held is None:
                lock.release()

    def leased_by(self, key: str) -> builtins.list[str]:
        """The live leases that name snapshot ``key``."""
        return [
            lease.name
            for lease in self.leases.list()
            if key in lease.snapshots and not lease.expired()
        ]

    def _discard(self, d: Path) -> None:
        """Atomically make a snapshot directory disappear, then delete it."""
        grave = self.trash / secrets.token_hex(8)
        os.rename(d, grave)
        fsync_dir(d.parent)
        shutil.rmtree(grave, ignore_errors=True)

    def _mounted(self, d: Path) -> bool:
        loops = {(lo.major, lo.minor) for lo in system.loops_backed_under(d)}
        return bool(loops) and any((m.major, m.minor) in loops for m in system.mounts())

    # -- crash recovery ----------------------------------------------------------------------

    def recover(self) -> builtins.list[str]:
        """Undo what killed processes left: mounts, loop devices, half-built snapshots.

        Only touches things whose owner's lock is free, so a running ember
        process is never disturbed.  Returns a line per action, for logs.
        """
        done: list[str] = []
        with FileLock(self.pool.locks / RECOVER_LOCK):
            # 1. mounts of our snapshots nobody holds
            loops = {(lo.major, lo.minor): lo for lo in system.loops_backed_under(self.pool.root)}
            for m in system.mounts_under(self.pool.mnt):
                lo = loops.get((m.major, m.minor))
                owner = Path(lo.backing_file).parent if lo else None
                # (with its device: once released, another program may bind that
                # number at once, and the wait must not take its file for ours)
                lock = None
                if owner is not None and owner.exists():
                    lock = try_lock(owner / LOCK)
                    if lock is None:
                        continue
                try:
                    # Its builder is gone: a mount still busy after a moment (a file
                    # open in it, a shell's working directory) stays busy, and retrying
                    # for the usual ~8 s, then waiting for the lazy detach, held this
                    # lock, so every ember command, ~10 s.  A killed builder's applier
                    # child, chrooted in it, is gone within that moment.
                    system.unmount(m.mountpoint, device=lo, remove_mountpoint=True,
                                   attempts=RECOVERY_UNMOUNT_ATTEMPTS, lazy_grace=0.2)  # fmt: skip
                except CommandFailed as e:  # busy: detached lazily; the rest goes on
                    log.warning("recovery: %s", e)
                    continue
                finally:
                    if lock is not None:
                        lock.release()
                done.append(f"unmounted {m.mountpoint}")
                with suppress(OSError):
                    m.mountpoint.rmdir()
            # 2. loop devices on our disks that nothing mounts and nobody holds
            mounted = {(m.major, m.minor) for m in system.mounts()}
            releasing: list[system.LoopDevice] = []
            for lo in system.loops_backed_under(self.pool.root):
                if (lo.major, lo.minor) in mounted:
                    continue
                if system.loop_autoclear(lo):
                    # Already set to go on its last close: it is still open (a file kept
                    # open in a lazily detached mount, a copy of the mount in another
                    # namespace).  Detaching it again changes nothing, and the wait for
                    # it (5 s, in vain) held this lock, which every mount waits for, in
                    # every ember command until that user let go.
                    releasing.append(lo)
                    continue
                owner = Path(lo.backing_file.removesuffix(" (deleted)")).parent
                lock = try_lock(owner / LOCK) if owner.exists() else None
                if owner.exists() and lock is None:
                    continue
                try:
                    system.detach_loop(lo.device)
                    if system.wait_loop_released(lo.major, lo.minor, lo.backing_file):
                        done.append(f"detached {lo.device} ({lo.backing_file})")
                    else:  # (it said "detached" of one still bound)
                        done.append(f"set {lo.device} ({lo.backing_file}) to detach once "
                                    "nothing uses it")  # fmt: skip
                except SnapshotError as e:
                    log.warning("%s", e)
                finally:
                    if lock is not None:
                        lock.release()
            if releasing:
                log.info(
                    "recovery: left %s: still in use, released when the last process "
                    "using it lets go",
                    ", ".join(f"{lo.device} ({lo.backing_file})" for lo in releasing),
                )
            # 3. half-created and half-built snapshots, and the trash
            for entry in sorted(os.listdir(self.active_dir)):
                try:
                    if action := self._recover_active(entry):
                        done.append(action)
                except (OSError, SnapshotError) as e:
                    # one entry ember cannot make sense of must not fail every command
                    # that opens the store (each one recovers first)
                    log.warning("recovery: left %s alone: %s", self.active_dir / entry, e)
            for entry in os.listdir(self.trash):
                shutil.rmtree(self.trash / entry, ignore_errors=True)
            # 4. empty bases whose builder died before publishing them
            for entry in os.listdir(self.bases):
                if entry.startswith(".new-") and _age(self.bases / entry) > 600:
                    with suppress(FileNotFoundError, IsADirectoryError):  # (not ember's)
                        (self.bases / entry).unlink()
            # 5. empty mount points left between mkdir and mount
            for entry in os.listdir(self.pool.mnt):
                p = self.pool.mnt / entry
                try:
                    if time.time() - p.stat().st_mtime > 3600 and not system.is_mountpoint(p):
                        p.rmdir()
                except OSError:
                    pass
        for line in done:
            log.info("recovery: %s", line)
        return done

    def _recover_active(self, entry: str) -> str | None:
        """Recover one entry of active/: complete its interrupted commit, or discard it if
        half-built (``recover``'s step 3); what was done, if anything."""
        d = self.active_dir / entry
        building = entry.startswith(".new-")
        if building and not _real_dir(d):
            raise SnapshotError("not a directory ember made")
        if not building and _stray(d):
            return None
        if building and not (d / LOCK).exists() and _age(d) < 10:
            return None  # its creator is between mkdir and taking the lock
        lock = try_lock(d / LOCK)
        if lock is None:
            return None
        try:
            if not building and (name := self._interrupted_commit(d)):
                return f"completed the commit of {name}"
            if building or self._abandoned(d):
                self._discard(d)
                return f"discarded half-built snapshot {names.decode(entry)}"
            return None
        finally:
            lock.release()

    def _interrupted_commit(self, d: Path) -> str | None:
        """Finish a commit killed between its metadata write and its rename.

        By then the disk was complete, checked and fsync'ed (commit writes the
        new metadata last), so rolling forward loses nothing.
        """
        try:
            meta = self._meta(d)
        except (FileNotFoundError, SnapshotError):
            return None
        if meta.kind is not Kind.COMMITTED:
            return None
        target = self.committed_dir / names.encode(meta.key)
        if target.exists():
            return None  # someone committed that name meanwhile: this one is garbage
        try:
            os.rename(d, target)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return None  # committed between the look and the rename (a builder of the name)
        fsync_dir(self.active_dir)
        fsync_dir(self.committed_dir)
        return meta.key

    def _abandoned(self, d: Path) -> bool:
        try:
            meta = self._meta(d)
            return meta.transient or meta.kind is Kind.COMMITTED
        except (FileNotFoundError, SnapshotError):
            pass
        # unreadable metadata: garbage (a builder's, written without fsync), unless a
        # lease claims the key: a machine's root disk is never deleted for a bad meta.json
        key = names.decode(d.name)
        try:
            if self.leased_by(key):
                log.warning("keeping %s: its metadata is damaged, but a lease holds it", key)
                return False
        except SnapshotError as e:  # leases unreadable: nothing proves it is garbage
            log.warning("keeping %s: its metadata is damaged (%s)", key, e)
            return False
        return True


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _age(p: Path) -> float:
    try:
        return time.time() - p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _require_lock(path: Path, what: str, *, shared: bool = False) -> FileLock:
    lock = try_lock(path, shared=shared)
    if lock is None:
        raise SnapshotInUse(f"{what} is in use by another ember process")
    return lock
