"""The root of ember's error hierarchy.

Each area (oci, registry, store, unpack, snapshots, vm, net, machines) defines
its own subclasses in its own ``errors.py``.  The CLI prints any EmberError as
one line on stderr and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class EmberError(Exception):
    """An error a user can act on.  ``str(err)`` is the whole message."""

    #: process exit status the CLI uses for this error
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(EmberError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class NotFound(EmberError):
    """A named thing (image, snapshot, machine, ...) does not exist."""
