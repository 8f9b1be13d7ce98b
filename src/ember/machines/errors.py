"""Errors of the machines area."""

from __future__ import annotations

from ember.errors import EmberError, NotFound, UsageError


class MachineError(EmberError):
    """A machine could not be created, started or controlled."""


class MachineNotFound(NotFound, MachineError):
    """No machine has that name or id."""


class AmbiguousMachine(UsageError, MachineError):
    """An id prefix matches more than one machine."""


class NameInUse(UsageError, MachineError):
    """Another machine already has that name."""


class InvalidOption(UsageError, MachineError):
    """A run option (size, env file, name, ...) is malformed."""


class MachineRunning(UsageError, MachineError):
    """The operation needs a stopped machine."""


class MachineNotRunning(UsageError, MachineError):
    """The operation needs a running machine."""
