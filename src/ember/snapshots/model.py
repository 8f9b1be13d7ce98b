"""What the snapshotter hands out (pure data)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ember import jsonutil
from ember.snapshots.errors import SnapshotError


class Kind(StrEnum):
    ACTIVE = "active"  # writable, may be committed
    VIEW = "view"  # read-only active snapshot of a committed one
    COMMITTED = "committed"  # immutable; a parent for others


@dataclass(frozen=True)
class Mount:
    """How to mount a snapshot (containerd's ``Mount``): ``mount -t TYPE -o OPTIONS SOURCE``."""

    type: str
    source: Path
    options: tuple[str, ...]


@dataclass(frozen=True)
class ActiveSnapshot:
    key: str
    kind: Kind
    parent: str | None
    path: Path  # the disk image (a root block device for a VM)

    @property
    def mounts(self) -> list[Mount]:
        ro = ("ro", "noload") if self.kind is Kind.VIEW else ("rw",)
        return [Mount("ext4", self.path, ("loop", *ro))]


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    kind: Kind
    parent: str | None
    created: float
    size: int  # the ext4 file system's size in bytes
    path: Path
    labels: dict[str, str] = field(default_factory=dict)
    transient: bool = False  # made by a layer build; discarded if its builder dies
    #: why the snapshot cannot be used (damaged metadata, missing disk); None when it can
    damaged: str | None = None
    #: its metadata cannot be read, so its parent is unknown (``parent`` is None)
    unreadable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parent": self.parent,
            "kind": self.kind.value,
            "size": self.size,
            "created": self.created,
            "path": str(self.path),
            "labels": self.labels,
            "damaged": self.damaged,
        }


@dataclass(frozen=True)
class Usage:
    size: int  # bytes allocated to the disk image (shared extents included)
    exclusive: int  # bytes only this snapshot holds: what removing it frees
    apparent: int  # the disk image's file size


@dataclass(frozen=True)
class Meta:
    """``meta.json`` in every snapshot directory.  The directory (active/ or
    committed/) is the authority on whether a snapshot is committed."""

    key: str
    kind: Kind
    parent: str | None
    created: float
    labels: dict[str, str]
    transient: bool = False

    def dump(self) -> bytes:
        return json.dumps(
            {
                "key": self.key,
                "kind": self.kind.value,
                "parent": self.parent,
                "created": self.created,
                "labels": self.labels,
                "transient": self.transient,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def load(cls, data: bytes, where: Path) -> Meta:
        try:
            d = jsonutil.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            labels = d.get("labels", {})
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise ValueError("labels must map strings to strings")
            parent = d.get("parent")
            if parent is not None and not isinstance(parent, str):
                raise ValueError("parent must be a string")
            return cls(
                key=str(d["key"]),
                kind=Kind(d["kind"]),
                parent=parent,
                created=float(d["created"]),
                labels=labels,
                transient=bool(d.get("transient", False)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"snapshot metadata {where} is damaged: {e}") from e
