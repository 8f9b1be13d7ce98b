"""Errors of the layer unpacker."""

from __future__ import annotations

from ember.errors import EmberError


class UnpackError(EmberError):
    """A layer could not be applied onto its root.

    After an UnpackError the root is in an undefined, partly applied state:
    callers apply into a fresh snapshot and discard it on error.
    """


class InvalidLayer(UnpackError):
    """The layer's tar stream is malformed or holds an entry ember refuses."""


class DiffIDMismatch(UnpackError):
    """The uncompressed layer does not hash to the DiffID its image config declares."""


class UnsupportedLayer(UnpackError):
    """The layer's media type names a format ember cannot decompress."""
