"""Errors of the snapshotter: every message is one line a user can act on."""

from __future__ import annotations

from ember.errors import EmberError, NotFound, UsageError


class SnapshotError(EmberError):
    """Base of every snapshotter error."""


class SnapshotNotFound(NotFound, SnapshotError):
    pass


class SnapshotExists(SnapshotError):
    pass


class SnapshotInUse(SnapshotError):
    """Another process holds the snapshot (building, mounted) or it has children."""


class InvalidSnapshotKey(UsageError, SnapshotError):
    pass


class AmbiguousName(UsageError, SnapshotError):
    """A short name (a digest prefix) that more than one snapshot starts with."""


class InvalidDiskSize(UsageError, SnapshotError):
    """A disk size asked for (``--disk-size``) that no disk of this image can have."""


class PoolError(SnapshotError):
    """The copy-on-write pool cannot be set up or mounted."""


class CommandFailed(SnapshotError):
    """An external tool (mount, mkfs.ext4, e2fsck, resize2fs, ...) failed."""


class CheckFailed(SnapshotError):
    """A freshly built file system did not pass its check: it is never committed."""


class LeaseError(SnapshotError):
    pass


class LeaseNotFound(NotFound, LeaseError):
    pass


class MountFailed(CommandFailed):
    """A disk image could not be loop-mounted (missing, not ext4, no free loop device)."""


class RootsUnreadable(SnapshotError):
    """gc cannot tell what an image needs (its record or blobs cannot be read): it
    removes nothing."""
