"""Errors of the image format library."""

from __future__ import annotations

from ember.errors import EmberError


class FormatError(EmberError):
    """Bytes that claim to be an OCI/Docker object but are not valid."""


class InvalidDigest(FormatError):
    pass


class DigestMismatch(FormatError):
    """Content does not hash (or size) to what its descriptor promised."""


class InvalidReference(FormatError):
    pass


class UnsupportedMediaType(FormatError):
    pass


class NoMatchingPlatform(FormatError):
    pass


class InvalidManifest(FormatError):
    """A manifest or index that does not follow the image spec."""


class UnsupportedSchema(InvalidManifest):
    """A manifest format ember deliberately refuses (Docker schema 1)."""


class InvalidConfig(FormatError):
    """An image configuration that does not follow the image spec."""


class InvalidPlatform(FormatError):
    pass
