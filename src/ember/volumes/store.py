"""Volumes on a host: ext4 disks in the snapshot pool that outlive machines.

A volume is an active snapshot keyed ``volume/<name>``, made from an empty ext4
of its size (a reflink of the pool's cached empty base: constant time), and
protected from ``ember gc`` by a lease of the same name, and by gc itself, which
keeps every ``volume/`` snapshot whatever its lease.  Creating and removing
one happen under its own lock in the pool's lock directory, so a name is made
once, and a removal looks at the machines that use it (``in_use_by``) under that
lock too.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ember.home import Home
from ember.locks import FileLock
from ember.sizes import human_size
from ember.snapshots import names
from ember.snapshots.config import disk_size_problem
from ember.snapshots.errors import SnapshotNotFound
from ember.snapshots.model import Kind, SnapshotInfo
from ember.snapshots.snapshotter import Snapshotter
from ember.volumes.errors import VolumeError, VolumeExists, VolumeInUse, VolumeNotFound
from ember.volumes.spec import KEY_PREFIX as PREFIX
from ember.volumes.spec import volume_key

#: what ``ember volume create`` and a ``run -v`` of a new name make
DEFAULT_VOLUME_SIZE = 1 << 30
#: ember's own labels on a volume's snapshot (never shown as the volume's labels):
#: no machine has had it attached yet (only ember wrote to it; ``copyup``)
PRISTINE = "ember.pristine"
#: a copy-up under way: ``staging`` or ``moving`` (``copyup``)
COPY_UP = "ember.copy-up"
_OWN = "ember."


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    #: the ext4 file system's size in bytes
    size: int
    #: the disk image (a machine's VMM opens it)
    path: Path
    created: float
    labels: dict[str, str] = field(default_factory=dict)
    #: no machine has had it attached: what it holds, ember wrote (its copy-up)
    pristine: bool = False
    #: a copy-up that was interrupted: ``staging`` or ``moving``
    copy_up: str | None = None

    @classmethod
    def of(cls, info: SnapshotInfo) -> VolumeInfo:
        own = {k: v for k, v in info.labels.items() if k == "volume" or k.startswith(_OWN)}
        return cls(info.name.removeprefix(PREFIX), info.size, info.path, info.created,
                   {k: v for k, v in info.labels.items() if k not in own},
                   pristine=PRISTINE in own, copy_up=own.get(COPY_UP))  # fmt: skip

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "path": str(self.path),
            "created": self.created,
            "labels": self.labels,
        }


class Volumes:
    """The volumes of ``home``; made in its snapshot pool, which is set up when needed."""

    def __init__(self, home: Home) -> None:
        self.home = home

    @contextmanager
    def _locked(self, snap: Snapshotter, name: str) -> Iterator[None]:
        lock = snap.pool.locks / f"volume-{names.encode(volume_key(name))}.lock"
        with FileLock(lock, unlink_on_release=True):
            yield

    def create(
        self, name: str, size: int | None = None, labels: dict[str, str] | None = None
    ) -> VolumeInfo:
        """A new empty volume of ``size`` (default ``DEFAULT_VOLUME_SIZE``); the one that
        exists, as ``docker volume create`` of a name it has, unless it was asked for with
        another size or other labels (VolumeExists)."""
        key = volume_key(name)
        wanted = DEFAULT_VOLUME_SIZE if size is None else size
        if (problem := disk_size_problem(wanted)) is not None:  # (the snapshotter's rule)
            raise VolumeError(f"volume size {human_size(wanted)} {problem}")
        snap = Snapshotter(self.home)
        with self._locked(snap, name):
            if not snap.exists(key):
                return self._make(snap, key, name, wanted, labels or {})
            found = self._usable(snap.stat(key))
        if (size is not None and size != found.size) or (labels and labels != found.labels):
            raise VolumeExists(
                f"volume {name} already exists, with a size of {human_size(found.size)}"
                + (f" and the labels {found.labels}" if found.labels else "")
            )
        return found

    @contextmanager
    def holding(self, names: Iterable[str]) -> Iterator[Callable[[str, bool], VolumeInfo]]:
        """The locks of volumes ``names``, taken in name order (two holders never wait for
        each other), and while they are held a way to get each one: ``get(name, make)``,
        made empty (of the default size) when it does not exist and ``make``, as ``docker
        run -v NAME:...`` makes a name it does not know, else VolumeNotFound."""
        snap = Snapshotter(self.home)

        def get(name: str, make: bool) -> VolumeInfo:
            key = volume_key(name)
            if snap.exists(key):
                return self._usable(snap.stat(key))
            if not make:
                raise VolumeNotFound(f"volume {name} is gone")
            return self._make(snap, key, name, DEFAULT_VOLUME_SIZE, {})

        with ExitStack() as held:
            for name in sorted(set(names)):
                held.enter_context(self._locked(snap, name))
            yield get

    def _make(
        self, snap: Snapshotter, key: str, name: str, size: int, labels: dict[str, str]
    ) -> VolumeInfo:
        # the lease first: gc never sees the disk unprotected (a lease left by a create
        # killed before its disk was made names nothing; this one takes it over)
        snap.leases.create(key, exist_ok=True, snapshots=[key], labels={"volume": name})
        made = snap.prepare(key, None, size=size, labels={**labels, "volume": name, PRISTINE: "1"})
        return VolumeInfo.of(snap.stat(made.key))

    @staticmethod
    def _usable(info: SnapshotInfo) -> VolumeInfo:
        if info.damaged is not None:
            name = info.name.removeprefix(PREFIX)
            raise VolumeError(f"volume {name} is damaged: {info.damaged}")
        return VolumeInfo.of(info)

    def get(self, name: str) -> VolumeInfo:
        snap = Snapshotter.existing(self.home)
        try:
            if snap is None:
                raise SnapshotNotFound(name)
            return self._usable(snap.stat(volume_key(name)))
        except SnapshotNotFound:
            raise VolumeNotFound(f"no such volume: {name}") from None

    def list(self) -> builtins.list[VolumeInfo]:
        snap = Snapshotter.existing(self.home)
        if snap is None:
            return []
        found = [
            VolumeInfo.of(s)
            for s in snap.list()
            if s.kind is Kind.ACTIVE and s.name.startswith(PREFIX) and s.damaged is None
        ]
        return sorted(found, key=lambda v: v.name)

    def remove(self, name: str, in_use_by: Callable[[str], Sequence[str]]) -> None:
        """Delete volume ``name`` and what it holds.  ``in_use_by(name)``: the machines that
        use it (asked under the volume's lock); VolumeInUse when there are any."""
        key = volume_key(name)
        snap = Snapshotter.existing(self.home)
        if snap is None or not snap.exists(key):
            raise VolumeNotFound(f"no such volume: {name}")
        with self._locked(snap, name):
            users = in_use_by(name)
            if users:
                shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
                raise VolumeInUse(
                    f"volume {name} is in use by machine {shown}",
                    hint="remove the machines that use it first (ember rm)",
                )
            try:
                snap.remove(key)
            except SnapshotNotFound:
                raise VolumeNotFound(f"no such volume: {name}") from None
            snap.leases.delete(key)
