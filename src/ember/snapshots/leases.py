"""Leases: named, optionally expiring claims on snapshots and content.

A lease protects what an operation or a machine needs from ``ember gc``
(containerd's model).  It ends when its TTL runs out, or, for a lease with an
``Owner`` (an operation's), when that process is gone.  Each lease is one JSON file, written atomically, under
``$EMBER_HOME/snapshots/leases/``.  Every change to a lease happens under a
shared hold of the GC lock, so a collection sees either the lease before or
after the change, never a window where a new claim is invisible.
"""

from __future__ import annotations

import builtins
import functools
import json
import math
import os
import secrets
import shlex
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.fsutil import atomic_write
from ember.locks import FileLock
from ember.process import boot_id, proc_start_time, proc_stat
from ember.snapshots import names
from ember.snapshots.errors import LeaseError, LeaseNotFound, SnapshotError


@dataclass(frozen=True)
class Owner:
    """The process a lease lives with: when it is gone, so is the lease.

    A pid alone would be fooled by pid reuse and by reboots, so the process's
    start time (``/proc/PID/stat`` field 22, clock ticks since boot) and the
    boot's id are part of it.  ``pidns``: the pid namespace the pid belongs
    to; from another one the pid means nothing, and the owner counts as alive
    (the lease's TTL still ends it).
    """

    pid: int
    start: int
    boot: str
    pidns: str | None = None

    @classmethod
    def current(cls) -> Owner | None:
        """This process; None when /proc does not say enough to check it later (a lease
        without an owner then ends by its TTL only, as before owners existed)."""
        pid = os.getpid()
        start, boot = proc_start_time(pid), boot_id()
        if start is None or boot is None:
            return None
        return cls(pid, start, boot, _pid_namespace())

    def alive(self) -> bool:
        """False only when it is certain that the process is gone."""
        boot = boot_id()
        if boot is None:
            return True  # nothing to compare with
        if boot != self.boot:
            return False  # the host rebooted since
        if self.pidns is not None and self.pidns != _pid_namespace():
            return True
        try:
            stat = proc_stat(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            return False
        except (OSError, ValueError):
            return True  # hidden (hidepid) or unreadable: cannot tell
        return stat.start_time == self.start and not stat.ended

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "boot": self.boot, "pidns": self.pidns}

    @classmethod
    def from_json(cls, d: Any) -> Owner:
        pidns = d.get("pidns")
        return cls(
            pid=_int(d["pid"]), start=_int(d["start"]), boot=str(d["boot"]),
            pidns=None if pidns is None else str(pidns),
        )  # fmt: skip


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not a whole number: {value!r}")
    return value


@functools.cache
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Lease:
    name: str
    created: float
    expires: float | None  # unix time; None never expires
    snapshots: tuple[str, ...] = ()
    content: tuple[str, ...] = ()  # digests as text
    labels: dict[str, str] = field(default_factory=dict)
    #: the process the lease lives with (an operation's lease); None: it outlives
    #: processes (a machine's root disk), only ``expires`` ends it
    owner: Owner | None = None

    def expired(self, now: float | None = None) -> bool:
        """Past its expiry time, or its owner process is gone."""
        if self.expires is not None and (now if now is not None else time.time()) >= self.expires:
            return True
        return self.orphaned()

    def orphaned(self) -> bool:
        """Its owner process is gone (it was killed, or the host rebooted)."""
        return self.owner is not None and not self.owner.alive()

    def to_json(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "created": self.created,
            "expires": self.expires,
            "snapshots": list(self.snapshots),
            "content": list(self.content),
            "labels": self.labels,
        }
        if self.owner is not None:  # absent, not null: the format older ember wrote
            d["owner"] = self.owner.to_json()
        return d

    @classmethod
    def from_json(cls, d: Any, where: Path) -> Lease:
        try:
            expires = d.get("expires")
            for value in (d["created"], expires):
                # NaN compares false with everything: a lease that never expires
                if value is not None and not math.isfinite(float(value)):
                    raise ValueError(f"a time that is not a number: {value!r}")
            owner = d.get("owner")
            return cls(
                name=str(d["name"]),
                created=float(d["created"]),
                expires=None if expires is None else float(expires),
                snapshots=tuple(str(s) for s in d.get("snapshots", [])),
                content=tuple(str(c) for c in d.get("content", [])),
                labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
                owner=None if owner is None else Owner.from_json(owner),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LeaseError(f"lease file {where} is damaged: {e}") from e


@dataclass(frozen=True)
class DamagedLease:
    """A lease file that cannot be used (``Leases.scan``)."""

    name: str  # the lease name its file is under, as ``ember snapshot leases rm`` takes it
    path: Path
    error: LeaseError  # why, with how to remove it


class Leases:
    def __init__(self, directory: Path, gc_lock: Path) -> None:
        self.dir = directory
        self.gc_lock = gc_lock
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.dir / f"{names.encode(name, 'lease name')}.json"

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        # shared with other writers, exclusive against gc; the second lock
        # serialises read-modify-write of lease files among writers.
        with FileLock(self.gc_lock, shared=True), FileLock(self.dir / ".write.lock"):
            yield

    def _write(self, lease: Lease) -> None:
        atomic_write(
            self._path(lease.name), json.dumps(lease.to_json(), sort_keys=True).encode(), 0o600
        )

    def _read(self, path: Path) -> Lease:
        """The lease in ``path``; LeaseNotFound when there is none, LeaseError (with how to
        remove the file) when it is damaged or cannot be read."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LeaseNotFound(f"no lease {names.decode(path.stem)!r}") from None
        except OSError as e:  # EIO, EISDIR, ELOOP: as damaged as bad JSON
            raise self._damaged(path, f"lease file {path} cannot be read: {e.strerror}") from e
        try:
            lease = Lease.from_json(jsonutil.loads(data), path)
        except LeaseError as e:
            raise self._damaged(path, e.message) from e
        except ValueError as e:
            raise self._damaged(path, f"lease file {path} is damaged: {e}") from e
        # gc deletes an expired lease by its name: a file that names another lease (a
        # copy kept under another name) would take that one's file with it
        try:
            matches = path == self._path(lease.name)
        except SnapshotError:
            matches = False
        if not matches:
            raise self._damaged(
                path,
                f"lease file {path} is damaged: it holds lease {lease.name[:100]!r}",
                "if it is a stray copy",
            )
        return lease

    def _damaged(self, path: Path, message: str, when: str = "") -> LeaseError:
        """The error for a lease file that cannot be used, with how to remove it.

        What it protects is unknown, so gc and ``image rm`` stop on it, and it stayed
        until someone found the file: the hint names it as ``ember snapshot leases rm``
        takes it (by the lease name its file is under), or by its path when no lease
        name leads to that file, or when it is no file ``leases rm`` can unlink (a
        directory)."""
        name = names.decode(path.stem)
        try:
            addressable = path == self._path(name) and not path.is_dir()
        except SnapshotError:
            addressable = False
        how = (
            f"ember snapshot leases rm {shlex.quote(name)} removes it"
            if addressable
            else f"remove {path}"
        )
        return LeaseError(message, hint=f"{when}, {how}" if when else how)

    def create(
        self,
        name: str,
        *,
        ttl: float | None = None,
        snapshots: Iterable[str] = (),
        content: Iterable[str] = (),
        labels: dict[str, str] | None = None,
        exist_ok: bool = False,
        owner: Owner | None = None,
    ) -> Lease:
        """A new lease (``exist_ok``: or more for an existing one, which keeps its owner).
        ``owner``: the process it lives with (``Owner.current()``); without one only
        ``ttl`` ends it."""
        now = time.time()
        with self._mutating():
            path = self._path(name)
            if path.exists():
                if not exist_ok:
                    raise LeaseError(f"lease {name!r} already exists")
                old = self._read(path)
                lease = replace(
                    old,
                    expires=None if ttl is None else now + ttl,
                    snapshots=_merge(old.snapshots, snapshots),
                    content=_merge(old.content, content),
                )
            else:
                lease = Lease(
                    name, now, None if ttl is None else now + ttl,
                    _merge((), snapshots), _merge((), content), dict(labels or {}), owner,
                )  # fmt: skip
            self._write(lease)
            return lease

    def add(
        self, name: str, *, snapshots: Iterable[str] = (), content: Iterable[str] = ()
    ) -> Lease:
        with self._mutating():
            old = self._read(self._path(name))
            if old.expired():
                raise LeaseError(f"lease {name!r} has expired")
            lease = replace(
                old,
                snapshots=_merge(old.snapshots, snapshots),
                content=_merge(old.content, content),
            )
            self._write(lease)
            return lease

    def discard(
        self, name: str, *, snapshots: Iterable[str] = (), content: Iterable[str] = ()
    ) -> None:
        """Drop resources from a lease (a missing lease is fine)."""
        drop_s, drop_c = set(snapshots), set(content)
        with self._mutating():
            try:
                old = self._read(self._path(name))
            except LeaseNotFound:
                return
            self._write(
                replace(
                    old,
                    snapshots=tuple(s for s in old.snapshots if s not in drop_s),
                    content=tuple(c for c in old.content if c not in drop_c),
                )
            )

    def get(self, name: str) -> Lease:
        return self._read(self._path(name))

    def delete(self, name: str) -> bool:
        with self._mutating():
            try:
                os.unlink(self._path(name))
                return True
            except FileNotFoundError:
                return False

    def list(self) -> list[Lease]:
        """Every lease.  LeaseError when a lease file is damaged: what it protects is
        unknown, so gc and ``image rm`` must not go on (its hint says how to remove it)."""
        leases, damaged = self.scan()
        if damaged:
            raise damaged[0].error
        return leases

    def scan(self) -> tuple[builtins.list[Lease], builtins.list[DamagedLease]]:
        """Every lease, and every lease file that cannot be used (for a listing that
        shows them rather than fail on them)."""
        leases: list[Lease] = []
        damaged: list[DamagedLease] = []
        for entry in sorted(os.listdir(self.dir)):
            if entry.endswith(".json") and not entry.startswith("."):
                path = self.dir / entry
                try:
                    leases.append(self._read(path))
                except LeaseNotFound:
                    continue  # deleted since the listing
                except LeaseError as e:
                    damaged.append(DamagedLease(names.decode(path.stem), path, e))
        return leases, damaged

    @contextmanager
    def temporary(
        self, prefix: str, *, ttl: float, snapshots: Iterable[str] = (), content: Iterable[str] = ()
    ) -> Iterator[Lease]:
        """A lease for the length of one operation, owned by this process: it ends when the
        process dies (kill -9, a reboot), or after ``ttl`` in any case."""
        name = f"{prefix}/{secrets.token_hex(6)}"
        lease = self.create(
            name, ttl=ttl, snapshots=snapshots, content=content, owner=Owner.current()
        )
        try:
            yield lease
        finally:
            self.delete(name)


def _merge(old: Iterable[str], new: Iterable[str]) -> tuple[str, ...]:
    seen = dict.fromkeys(old)
    seen.update(dict.fromkeys(new))
    return tuple(seen)
