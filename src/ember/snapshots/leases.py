"""Leases: named, optionally expiring claims on snapshots and content.

A lease protects what an operation or a machine needs from ``ember gc``
(containerd's model).  Each lease is one JSON file, written atomically, under
``$EMBER_HOME/snapshots/leases/``.  Every change to a lease happens under a
shared hold of the GC lock, so a collection sees either the lease before or
after the change, never a window where a new claim is invisible.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.fsutil import atomic_write
from ember.snapshots import names
from ember.snapshots.errors import LeaseError, LeaseNotFound, SnapshotError
from ember.snapshots.locks import FileLock


@dataclass(frozen=True)
class Lease:
    name: str
    created: float
    expires: float | None  # unix time; None never expires
    snapshots: tuple[str, ...] = ()
    content: tuple[str, ...] = ()  # digests as text
    labels: dict[str, str] = field(default_factory=dict)

    def expired(self, now: float | None = None) -> bool:
        return (
            self.expires is not None and (now if now is not None else time.time()) >= self.expires
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": self.created,
            "expires": self.expires,
            "snapshots": list(self.snapshots),
            "content": list(self.content),
            "labels": self.labels,
        }

    @classmethod
    def from_json(cls, d: Any, where: Path) -> Lease:
        try:
            expires = d.get("expires")
            for value in (d["created"], expires):
                # NaN compares false with everything: a lease that never expires
                if value is not None and not math.isfinite(float(value)):
                    raise ValueError(f"a time that is not a number: {value!r}")
            return cls(
                name=str(d["name"]),
                created=float(d["created"]),
                expires=None if expires is None else float(expires),
                snapshots=tuple(str(s) for s in d.get("snapshots", [])),
                content=tuple(str(c) for c in d.get("content", [])),
                labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LeaseError(f"lease file {where} is damaged: {e}") from e


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
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LeaseNotFound(f"no lease {names.decode(path.stem)!r}") from None
        try:
            raw = jsonutil.loads(data)
        except ValueError as e:
            raise LeaseError(f"lease file {path} is damaged: {e}") from e
        lease = Lease.from_json(raw, path)
        # gc deletes an expired lease by its name: a file that names another lease (a
        # copy kept under another name) would take that one's file with it
        try:
            matches = path == self._path(lease.name)
        except SnapshotError:
            matches = False
        if not matches:
            raise LeaseError(
                f"lease file {path} is damaged: it holds lease {lease.name[:100]!r}",
                hint=f"remove {path} if it is a stray copy",
            )
        return lease

    def create(
        self,
        name: str,
        *,
        ttl: float | None = None,
        snapshots: Iterable[str] = (),
        content: Iterable[str] = (),
        labels: dict[str, str] | None = None,
        exist_ok: bool = False,
    ) -> Lease:
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
                    _merge((), snapshots), _merge((), content), dict(labels or {}),
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
        out = []
        for entry in sorted(os.listdir(self.dir)):
            if entry.endswith(".json") and not entry.startswith("."):
                try:
                    out.append(self._read(self.dir / entry))
                except LeaseNotFound:
                    continue
        return out

    @contextmanager
    def temporary(
        self, prefix: str, *, ttl: float, snapshots: Iterable[str] = (), content: Iterable[str] = ()
    ) -> Iterator[Lease]:
        """A lease for the length of one operation; it expires by itself if the process dies."""
        name = f"{prefix}/{secrets.token_hex(6)}"
        lease = self.create(name, ttl=ttl, snapshots=snapshots, content=content)
        try:
            yield lease
        finally:
            self.delete(name)


def _merge(old: Iterable[str], new: Iterable[str]) -> tuple[str, ...]:
    seen = dict.fromkeys(old)
    seen.update(dict.fromkeys(new))
    return tuple(seen)
