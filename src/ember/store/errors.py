"""Errors of the storage layer."""

from __future__ import annotations

from ember.errors import EmberError, NotFound


class StoreError(EmberError):
    pass


class BlobNotFound(NotFound, StoreError):
    pass


class DatabaseError(StoreError):
    pass
