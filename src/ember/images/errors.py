"""Errors of the image service."""

from __future__ import annotations

from ember.errors import EmberError, NotFound, UsageError


class ImageError(EmberError):
    pass


class ImageNotFound(NotFound, ImageError):
    pass


class InvalidImage(ImageError):
    """The manifest, config and layers do not make a runnable image."""


class InvalidSource(UsageError, ImageError):
    """A local source (``oci:``, ``docker-archive:``) that cannot be read as asked."""


class AmbiguousImage(UsageError, ImageError):
    """A digest that names an image under several names, where one was expected."""


class SaveError(ImageError):
    """An archive that cannot be written (``ember image save``)."""
