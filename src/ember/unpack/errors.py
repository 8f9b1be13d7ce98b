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


class NoSpace(UnpackError):
    """The target ran out of blocks or inodes while a layer was applied."""


class NeedsKernel(UnpackError):
    """Writing this layer into an ext4 image through libext2fs would take too long (a
    directory with very many entries: libext2fs adds each by reading the whole
    directory); the caller applies it to the mounted disk instead."""


class UnsupportedLayer(UnpackError):
    """The layer's media type names a format ember cannot decompress."""
