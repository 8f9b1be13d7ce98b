"""Errors of the VMM backends."""

from __future__ import annotations

from ember.errors import EmberError


class VMMError(EmberError):
    """The hypervisor could not be started or controlled."""


class VMMNotInstalled(VMMError):
    """The hypervisor binary is missing."""


class ControlChannelError(VMMError):
    """The guest's control channel could not be reached."""
