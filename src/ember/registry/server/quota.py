"""An organization's storage quota and its limit on repositories, as the request
handlers check them: reads of the quota, reservations of room for upload sessions
(Room, HeldBlob: the storage.Allowance an upload grows into), and the errors that
tell the client which limit it reached."""

from __future__ import annotations

import math

from ember.oci.digest import Digest
from ember.registry.server.config import ServerLimits
from ember.registry.server.dbcalls import DbCalls
from ember.registry.server.errors import ApiError, OrgLimitReached
from ember.registry.server.metadata import Quota, RegistryMetadata
from ember.registry.server.storage import Allowance

#: how far ahead a streamed upload body (no Content-Length) reserves room under its
#: organization's quota, at least: as far as the session's size beyond that (so a body
#: of N bytes takes about log2(N / QUOTA_STEP) reservations, each a database write and
#: a sum over the organization's content), never more than a quarter of what is left
QUOTA_STEP = 8 << 20


class Quotas:
    def __init__(self, meta: RegistryMetadata, db: DbCalls, limits: ServerLimits) -> None:
        self.meta = meta
        self.db = db
        self.limits = limits

    async def quota(
        self, org: str, digest: Digest | None = None, session: str | None = None
    ) -> Quota | None:
        """``org``'s quota and use (None: it has none); see RegistryMetadata.quota."""
        return await self.db.read(self.meta.quota, org, str(digest) if digest else None, session)

    async def exceeded(
        self, org: str, size: int, digest: Digest | None = None, session: str | None = None
    ) -> Quota | None:
        """``org``'s quota when ``size`` more bytes (a blob ``digest`` it holds already
        costs none; upload ``session``'s own bytes left out of the use) would pass it;
        None when they fit."""
        quota = await self.quota(org, digest, session)
        return None if quota is None or quota.allows(size) else quota

    async def bounded(self, org: str, digest: Digest | None = None) -> bool:
        """Whether ``org``'s uploads must fit a quota (see RegistryMetadata.bounded)."""
        return await self.db.read(self.meta.bounded, org, str(digest) if digest else None)

    async def allowance(
        self, org: str, session: str, digest: Digest | None = None, expected: int | None = None
    ) -> Allowance | None:
        """What upload ``session`` may grow into while a body streams (None: no bound).
        When the organization holds ``digest`` the bytes cost nothing, but they may not
        outgrow that blob (then they are not it); checked again when published.
        ``expected``: the size the body will take it to, if known."""
        if not await self.bounded(org):
            return None
        if digest is not None:
            held = await self.db.read(self.meta.held_size, org, str(digest))
            if held is not None:
                return HeldBlob(self.meta, self.db, session, digest, held)
        return Room(self.meta, self.db, org, session, expected)

    async def reserve(
        self, org: str, session: str, size: int, digest: Digest | None = None
    ) -> Quota | None:
        """Reserve ``size`` bytes, the whole of upload ``session``, under the quota (free
        if the organization holds ``digest``), in one transaction: a reservation, not a
        check, so two uploads finishing at once cannot both take the last room.  None
        when they fit; else the Quota that refused."""
        if not await self.bounded(org, digest):
            return None  # without a database write: the common case, no quota
        got = await self.db.write(
            self.meta.reserve_upload, org, session, size, 0, str(digest) if digest else None
        )
        return got if isinstance(got, Quota) else None

    async def ensure_repo(self, org: str, full: str) -> int:
        """The id of repository ``full``, created if need be: refused (403) when the
        organization has as many repositories as it may."""
        try:
            return await self.db.write(self.meta.ensure_repo, org, full, self.limits.max_repositories)
        except OrgLimitReached as e:
            raise limit_reached(e) from None


def quota_org(org: str, quota: Quota | None) -> str | None:
    """The organization whose quota a write must check again, in its own transaction
    (a check read before it is not a reservation): None when it had no quota."""
    return None if quota is None else org


def over_quota(org: str, quota: Quota, needs: str | None, what: str = "upload") -> ApiError:
    """``needs``: what the upload (or manifest) would add, or None when nothing fits
    any more."""
    parts = [f"{quota.used} of {quota.limit} bytes used"]
    if quota.uploads:  # room the client can free: by finishing or cancelling them
        parts[0] += f" ({quota.uploads} of them by unfinished uploads)"
    if needs is not None:
        parts.append(f"this {what} needs {needs}")
    return ApiError("DENIED", f"organization {org} is over its storage quota: {', '.join(parts)}")


#: the most Retry-After a refused upload session is told: the hour a session counts is
#: the latest time room comes, but the organization's other sessions may end any moment
#: (skopeo, which honours Retry-After up to 60 s, waited a minute after one had)
RETRY_AFTER_MAX = 10


def limit_reached(e: OrgLimitReached) -> ApiError:
    """The answer to a request that wanted one upload session (or repository) more than
    its organization may have.  Too many open sessions is 429 TOOMANYREQUESTS, what
    Distribution's error codes have for it: a session counts for an hour only, and
    containers/image may retry it later; docker, like for 403, shows the message.  Too many
    repositories is 403 DENIED: that lasts until some are emptied."""
    if e.what == "uploads":
        later = "later" if e.retry_after is None else f"in {_duration(e.retry_after)}"
        return ApiError(
            "TOOMANYREQUESTS",
            f"organization {e.org} has opened {e.limit} uploads in the last hour that are "
            f"not finished, the most it may have: finish or cancel some, or try again {later} "
            "(an upload counts for an hour after it started)",
            headers={}
            if e.retry_after is None
            else {"Retry-After": str(min(e.retry_after, RETRY_AFTER_MAX))},
        )
    return ApiError(
        "DENIED",
        f"organization {e.org} has {e.limit} repositories, the most it may have: push into "
        "one of them, or delete the manifests and blobs of one it no longer needs (a "
        "repository left with nothing is removed an hour after it was made)",
    )


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    return f"{math.ceil(seconds / 60)} min"


class Room:
    """An upload session's room under its organization's quota (a storage.Allowance),
    reserved in the database as the body arrives: the organization's open sessions
    together never hold more than its quota leaves, however many stream at once."""

    def __init__(
        self, meta: RegistryMetadata, db: DbCalls, org: str, session: str, expected: int | None
    ) -> None:
        self.meta = meta
        self.db = db
        self.org = org
        self.session = session
        self.expected = expected
        self.reserved = False

    async def grow(self, size: int) -> int:
        # A body of known length reserves all of it at once (refused before a byte of
        # it is written); a streamed one ahead of what it needs (see QUOTA_STEP).
        need = max(size, self.expected or 0)
        ahead = 0 if self.expected is not None else max(QUOTA_STEP, size)
        got = await self.db.write(self.meta.reserve_upload, self.org, self.session, need, ahead)
        if isinstance(got, Quota):
            raise over_quota(self.org, got, f"more than the {got.room} bytes left")
        self.reserved = True
        return got

    async def settle(self, size: int) -> None:
        if self.reserved:  # give back what was reserved and not used
            await self.db.write(self.meta.settle_upload, self.session, size)


class HeldBlob:
    """The room of an upload that claims to be a blob its organization holds already
    (free under the quota): that blob's size, no more.  A body that grows past it cannot
    be the blob; unbounded, it could put any amount past the quota on disk while it
    streamed, to be refused only when its digest was checked.

    What the body left in the session is recorded as the session's when it ends
    (``settle``), as a Room's is, so they count from then on.  Free only if they become
    the blob, when the session ends in one transaction with its bytes; a request that
    ends any other way (the client hung up mid-body, the chunk was refused, publication
    failed) must have them fit the quota or lose the session (Uploads.put): recorded
    unchecked, sessions ended that way one after another held up to the blob's size
    each past the quota."""

    def __init__(
        self, meta: RegistryMetadata, db: DbCalls, session: str, digest: Digest, size: int
    ) -> None:
        self.meta = meta
        self.db = db
        self.session = session
        self.digest = digest
        self.size = size
        #: whether the request wrote bytes under it, for free (else nothing to check)
        self.granted = False

    async def grow(self, size: int) -> int:
        if size > self.size:
            raise ApiError(
                "DIGEST_INVALID",
                f"the upload is larger than {self.digest}, which has {self.size} bytes",
            )
        self.granted = True
        return self.size

    async def settle(self, size: int) -> None:
        await self.db.write(self.meta.settle_upload, self.session, size)
