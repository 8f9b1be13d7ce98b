"""Errors of the networking area."""

from __future__ import annotations

from ember.errors import EmberError, UsageError


class NetworkError(EmberError):
    """Host networking could not be set up or torn down."""


class InvalidPortSpec(UsageError, NetworkError):
    """A ``-p`` value is malformed."""


class PortConflict(UsageError, NetworkError):
    """A host port is already published by another machine, or served by a program of the host."""


class SubnetExhausted(NetworkError):
    """No free address pair is left in the machine subnet."""
