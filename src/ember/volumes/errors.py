"""Errors of the volumes area."""

from __future__ import annotations

from ember.errors import EmberError, NotFound, UsageError


class VolumeError(EmberError):
    """A volume could not be made, found, attached or removed."""


class VolumeNotFound(NotFound, VolumeError):
    """No volume has that name."""


class VolumeExists(UsageError, VolumeError):
    """``ember volume create`` of a name another volume has."""


class VolumeInUse(VolumeError):
    """A machine uses the volume (removing it), or a running one does (attaching it)."""


class InvalidVolumeSpec(UsageError, VolumeError):
    """A malformed volume name or ``-v`` argument."""
