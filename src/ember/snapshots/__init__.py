"""Snapshots: image layer chains as ext4 disk images on a copy-on-write pool.

containerd's model (prepare, view, commit, remove, list, usage; leases; GC)
with reflink clones instead of device-mapper thin snapshots.  See
docs/snapshots.md.
"""

from __future__ import annotations

from ember.snapshots.config import SnapshotConfig
from ember.snapshots.model import ActiveSnapshot, Kind, Mount, SnapshotInfo, Usage
from ember.snapshots.snapshotter import Snapshotter

__all__ = [
    "ActiveSnapshot",
    "Kind",
    "Mount",
    "SnapshotConfig",
    "SnapshotInfo",
    "Snapshotter",
    "Usage",
]
