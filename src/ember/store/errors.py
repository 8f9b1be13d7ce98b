"""Errors of the storage layer."""

from __future__ import annotations

from ember.errors import EmberError, NotFound


class StoreError(EmberError):
    pass


class BlobNotFound(NotFound, StoreError):
    pass


class DamagedBlob(StoreError):
    """A stored blob that no longer matches its digest (it was removed)."""


class DatabaseError(StoreError):
    pass


class DatabaseBusy(DatabaseError):
    """Another writer held the database past the wait ember allows (SQLite's busy
    timeout, PostgreSQL's lock timeout): nothing is wrong with it, a retry may pass."""


class DamagedImageRecord(DatabaseError):
    """A row of the image table whose values cannot be read back."""

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(
            f"the image table's record of {reference[:200]} is damaged ({reason})",
            hint=f"forget it: ember image rm {reference[:200]}",
        )
        self.reference = reference
