"""Blob uploads: the handlers of ``/v2/<name>/blobs/uploads/`` (start, with a mount
from another repository; status; PATCH a chunk; PUT to finish; DELETE to cancel),
each within its organization's quota and its limit on open upload sessions.

A session's URL carries its signed state (uploadstate.py): the organization,
repository and session it belongs to, and when it expires.
"""

from __future__ import annotations

import time
import uuid

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ember.oci.digest import Digest
from ember.oci.errors import FormatError
from ember.registry.server.config import ServerLimits
from ember.registry.server.context import RequestContext, discard
from ember.registry.server.dbcalls import DbCalls
from ember.registry.server.errors import ApiError, OrgLimitReached
from ember.registry.server.gc import MONOLITHIC_PREFIX
from ember.registry.server.metadata import Quota, RegistryMetadata
from ember.registry.server.names import qualify, valid_repo_name
from ember.registry.server.protocol import content_length, parse_content_range
from ember.registry.server.quota import (
    HeldBlob,
    Quotas,
    limit_reached,
    over_quota,
    quota_org,
)
from ember.registry.server.responses import API_VERSION
from ember.registry.server.storage import Allowance, BlobStorage, range_header, touch
from ember.registry.server.uploadstate import (
    UPLOAD_TTL,
    InvalidUploadState,
    UploadState,
    sign_state,
    verify_state,
)

#: chunk size clients should use for chunked uploads (advertised, not enforced)
CHUNK_MIN_LENGTH = 1 << 20
#: body bytes of a refused upload chunk read and dropped so the client sees the answer
QUOTA_DRAIN_LIMIT = 64 << 20


class Uploads:
    def __init__(
        self,
        meta: RegistryMetadata,
        storage: BlobStorage,
        db: DbCalls,
        quotas: Quotas,
        limits: ServerLimits,
        upload_key: bytes,
    ) -> None:
        self.meta = meta
        self.storage = storage
        self.db = db
        self.quotas = quotas
        self.limits = limits
        self._upload_key = upload_key

    # -- handlers ----------------------------------------------------------------------

    async def start(self, ctx: RequestContext) -> Response:
        params = ctx.request.query_params
        mount, source = params.get("mount"), params.get("from")
        if mount and source:
            mounted = await self._try_mount(ctx, mount, source)
            if mounted is not None:
                return blob_created(ctx, mounted)
        await self._check_quota(ctx, 0)
        digest_param = params.get("digest")
        session = uuid.uuid4().hex
        if digest_param is not None:  # (marked: gc.purge drops one a kill left behind)
            session = MONOLITHIC_PREFIX + session[1:]
        expires = int(time.time()) + UPLOAD_TTL
        repo_id = await self._open_session(ctx, session, expires)
        if digest_param is not None:
            # monolithic upload: POST ?digest= with the whole blob as the body
            try:
                digest = _parse_digest(digest_param)
                length = content_length(ctx.request.headers.get("content-length"))
                room = await self.quotas.allowance(ctx.org, session, digest, length)
                await self._append_within_quota(ctx, session, 0, None, room)
                return await self._finish(ctx, repo_id, session, digest)
            except BaseException:
                # the client never got this session's URL (refused, or it hung up
                # mid-body): nothing can resume or end it, and its bytes would stay
                await self._drop_session(session)
                raise
        return Response(
            b"", status_code=202, headers=self._upload_headers(ctx, session, 0, expires)
        )

    async def status(self, ctx: RequestContext) -> Response:
        state = self._session(ctx)
        size = self.storage.session_size(state.session) or 0
        headers = self._upload_headers(ctx, state.session, size, state.expires)
        return Response(b"", status_code=204, headers=headers)

    async def patch(self, ctx: RequestContext) -> Response:
        state = self._session(ctx)
        start, limit = self._chunk_range(ctx, state)
        length = content_length(ctx.request.headers.get("content-length"))
        if length is not None:  # refused before a byte is written
            current = self.storage.session_size(state.session) or 0
            if start != current:
                # a chunk out of order is a 416 that keeps the session, quota or not
                # (append checks again under the session's lock)
                await discard(ctx.request, QUOTA_DRAIN_LIMIT)
                raise self._out_of_order(ctx, state, ApiError(
                    "BLOB_UPLOAD_INVALID",
                    f"chunk starts at {start} but the upload has {current} bytes",
                    status=416,
                ))
            try:
                await self._check_quota(ctx, start + length, session=state.session)
            except ApiError:
                # read (not kept) what the client sends anyway, up to a bound, so that it
                # gets to read the refusal rather than a reset connection
                await discard(ctx.request, QUOTA_DRAIN_LIMIT)
                raise
        room = await self._room(ctx, state.session, start, limit)
        size = await self._append(ctx, state, start, limit, room)
        headers = self._upload_headers(ctx, state.session, size, state.expires)
        return Response(b"", status_code=202, headers=headers)

    async def put(self, ctx: RequestContext) -> Response:
        state = self._session(ctx)
        digest = _parse_digest(ctx.request.query_params.get("digest"))
        # docker sends the last PATCH's Location with an empty body: nothing to append
        has_body = bool(content_length(ctx.request.headers.get("content-length"))) or (
            "chunked" in ctx.request.headers.get("transfer-encoding", "").lower()
        )
        if not (has_body or ctx.request.headers.get("content-range")):
            return await self._finish(ctx, None, state.session, digest)
        start, limit = self._chunk_range(ctx, state)
        room = await self._room(ctx, state.session, start, limit, digest)
        try:
            await self._append(ctx, state, start, limit, room)
            return await self._finish(ctx, None, state.session, digest)
        except Exception as e:
            if isinstance(room, HeldBlob) and room.granted:
                await self._count_unpublished(ctx, state.session, e)
            raise

    async def cancel(self, ctx: RequestContext) -> Response:
        state = self._session(ctx)
        self.storage.drop_session(state.session)  # 409 while another request uses it
        await self.db.write(self.meta.delete_upload, state.session)
        return Response(b"", status_code=204, headers=API_VERSION)

    # -- sessions ----------------------------------------------------------------------

    def _upload_headers(
        self, ctx: RequestContext, session: str, size: int, expires: int
    ) -> dict[str, str]:
        """``expires``: the session's, fixed when it started: a URL outlives neither the
        session's row nor its place in the quota (both end then)."""
        state = UploadState(ctx.org, ctx.full, session, size, expires)
        token = sign_state(self._upload_key, state)
        return {
            **API_VERSION,
            "Location": ctx.location(f"blobs/uploads/{session}?_state={token}"),
            "Range": range_header(size),
            "Docker-Upload-UUID": session,
            "OCI-Chunk-Min-Length": str(CHUNK_MIN_LENGTH),
        }

    async def _try_mount(self, ctx: RequestContext, mount: str, source: str) -> Digest | None:
        """Link ``mount`` from ``source`` if the caller may pull it there; else None.

        Every refusal looks the same to the client (a plain upload session follows),
        so a mount reveals nothing about other repositories.
        """
        assert ctx.grant is not None
        if not valid_repo_name(source):
            return None
        try:
            digest = Digest.parse(mount)
        except FormatError:
            return None
        source_full = qualify(ctx.grant.org, source)
        if not ctx.grant.allows(source_full, "pull"):
            return None
        async with self.storage.publishing():
            size = await self.db.read(self.meta.blob_size, source_full, str(digest))
            path = self.storage.blob_path(digest)
            if size is None or not path.exists():
                return None
            # past the quota: the upload that follows is refused with the reason
            quota = await self.quotas.quota(ctx.org, digest)
            if quota is not None and not quota.allows(size):
                return None
            try:
                repo_id = await self.quotas.ensure_repo(ctx.org, ctx.full)
            except ApiError:  # one repository too many: the upload that follows says so
                return None
            touch(path)
            refused = await self.db.write(
                self.meta.link_blob, repo_id, str(digest), size, quota_org(ctx.org, quota)
            )
            if refused is not None:
                return None
        return digest

    async def _open_session(self, ctx: RequestContext, session: str, expires: int) -> int:
        """A new upload session: its row (with its repository, if new), then its file;
        refused when the organization has as many open sessions, or repositories, as
        it may.  The repository's id.

        Under the shared GC lock, as every write that makes sure its repository exists:
        the purge deletes a repository left with nothing under the exclusive one, and one
        between the lookup of an empty repository and the session's row that names it
        failed the row's insert (a foreign key, answered 500)."""
        try:
            async with self.storage.publishing():
                repo_id = await self.db.write(
                    self.meta.create_upload, ctx.org, ctx.full, session, expires,
                    self.limits.max_uploads, self.limits.max_repositories,
                )  # fmt: skip
        except OrgLimitReached as e:
            raise limit_reached(e) from None
        # after the row: a file is never without its session's row (gc._stale_uploads);
        # the row holds no room before its file exists (gc._dead_upload relies on it)
        try:
            self.storage.create_session(session)
        except OSError:
            await self.db.write(self.meta.delete_upload, session)
            raise
        return repo_id

    def _session(self, ctx: RequestContext) -> UploadState:
        """The verified upload state of this request, bound to this org, repo and session."""
        assert ctx.grant is not None and ctx.route.upload_id is not None
        unknown = ApiError("BLOB_UPLOAD_UNKNOWN", "upload session is unknown or its URL is not valid")
        text = ctx.request.query_params.get("_state")
        if not text:
            raise unknown
        try:
            state = verify_state(self._upload_key, text, int(time.time()))
        except InvalidUploadState:
            raise unknown from None
        if (state.org, state.repo, state.session) != (ctx.grant.org, ctx.full, ctx.route.upload_id):
            raise unknown
        if self.storage.session_size(state.session) is None:
            raise unknown
        return state

    async def _drop_session(self, session: str) -> None:
        """An upload session and its row (unless a request is appending to it meanwhile)."""
        if self.storage.drop_session_if_idle(session):
            await self.db.write(self.meta.delete_upload, session)

    # -- chunks ------------------------------------------------------------------------

    def _chunk_range(self, ctx: RequestContext, state: UploadState) -> tuple[int, int | None]:
        """Where the body must start (Content-Range if given, else the URL's offset) and
        how long Content-Range says it is (None without one)."""
        value = ctx.request.headers.get("content-range")
        if value is None:
            return state.offset, None
        start, end = parse_content_range(value)
        length = content_length(ctx.request.headers.get("content-length"))
        if length is not None and length != end - start + 1:
            raise ApiError(
                "BLOB_UPLOAD_INVALID",
                f"Content-Range {value!r} does not match Content-Length {length}",
                status=416,
            )
        return start, end - start + 1

    def _out_of_order(self, ctx: RequestContext, state: UploadState, e: ApiError) -> ApiError:
        """A 416 tells the client where the upload stands (Range, Location)."""
        if e.status == 416:
            current = self.storage.session_size(state.session) or 0
            e.headers.update(self._upload_headers(ctx, state.session, current, state.expires))
        return e

    async def _room(
        self,
        ctx: RequestContext,
        session: str,
        start: int,
        limit: int | None,
        digest: Digest | None = None,
    ) -> Allowance | None:
        """What the request's body, a chunk starting at ``start`` (``limit``: its length
        by Content-Range), may take ``session`` to under the quota (a final PUT's
        ``digest``, if the organization holds it, costs nothing)."""
        length = content_length(ctx.request.headers.get("content-length"))
        known = length if length is not None else limit
        expected = None if known is None else start + known
        return await self.quotas.allowance(ctx.org, session, digest, expected)

    async def _append(
        self,
        ctx: RequestContext,
        state: UploadState,
        start: int,
        limit: int | None,
        room: Allowance | None,
    ) -> int:
        """Append the request's body as a chunk starting at ``start`` (``limit``: its
        length by Content-Range), within ``room``."""
        try:
            return await self._append_within_quota(ctx, state.session, start, limit, room)
        except ApiError as e:
            raise self._out_of_order(ctx, state, e) from None

    async def _append_within_quota(
        self,
        ctx: RequestContext,
        session: str,
        start: int | None,
        limit: int | None,
        room: Allowance | None,
    ) -> int:
        """storage.append within the quota's room; past it the session is dropped and the
        client told the quota's figures (403 DENIED)."""
        try:
            return await self.storage.append(session, ctx.request.stream(), start, limit, room)
        except ApiError as e:
            if e.code == "DENIED" and room is not None:
                await self._drop_session(session)
            raise

    # -- the quota ---------------------------------------------------------------------

    async def _check_quota(
        self, ctx: RequestContext, size: int, digest: Digest | None = None, session: str | None = None
    ) -> None:
        """403 DENIED when ``size`` bytes do not fit the organization's quota (``session``:
        the upload they are for, whose bytes so far are part of ``size``); that session,
        if any, is dropped (its bytes would only take room)."""
        quota = await self.quotas.exceeded(ctx.org, size, digest, session)
        if quota is None:
            return
        if session is not None:
            await self._drop_session(session)
        raise over_quota(ctx.org, quota, str(size) if size else None)

    async def _hold(
        self, ctx: RequestContext, session: str, size: int, digest: Digest | None = None
    ) -> Quota | None:
        """Reserve upload ``session``'s ``size`` bytes under the quota (Quotas.reserve).
        None when they fit; else the session is dropped and the Quota that refused
        returned."""
        refused = await self.quotas.reserve(ctx.org, session, size, digest)
        if refused is None:
            return None
        await self._drop_session(session)
        return refused

    async def _count_unpublished(self, ctx: RequestContext, session: str, e: Exception) -> None:
        """A final PUT whose body claimed a blob the organization holds (free while it
        streamed, see HeldBlob) ended without publishing it: the client hung up mid-body,
        the body outran its Content-Range, or publication failed.  Its bytes are not
        that blob, so they must fit the quota like any others or go, as a refused
        upload's do: kept free, sessions ended that way one after another would each
        hold up to that blob's size past the quota.  Raises 403 DENIED (caused by ``e``)
        when the session was dropped: a 416 would send the client to a session that is
        gone."""
        size = self.storage.session_size(session)
        if size is None:  # published, or dropped already (a wrong digest that did not fit)
            return
        refused = await self._hold(ctx, session, size)
        if refused is not None:
            raise over_quota(ctx.org, refused, str(size)) from e

    # -- publishing --------------------------------------------------------------------

    async def _finish(
        self, ctx: RequestContext, repo_id: int | None, session: str, digest: Digest
    ) -> Response:
        """Publish upload ``session`` as ``digest`` into the request's repository:
        ``repo_id`` if known, else looked up under the GC lock (a gc or purge deletes a
        repository left with nothing only under the exclusive one)."""
        size = self.storage.session_size(session) or 0
        refused = await self._hold(ctx, session, size, digest)
        if refused is not None:
            raise over_quota(ctx.org, refused, str(size) if size else None)
        async with self.storage.publishing():
            if repo_id is None:
                repo_id = await self.quotas.ensure_repo(ctx.org, ctx.full)
            try:
                size = await run_in_threadpool(self.storage.publish, session, digest)
            except ApiError as e:
                # The reservation above let the bytes through for free if the organization
                # holds ``digest``; they are not that blob, so they must fit like any
                # others, or go (kept, they would be a way to store anything past the quota).
                if e.code == "DIGEST_INVALID":
                    await self._hold(ctx, session, size)
                raise
            # what the session held becomes the blob's, in one transaction
            await self.db.write(self.meta.link_upload, repo_id, session, str(digest), size)
        return blob_created(ctx, digest)


def blob_created(ctx: RequestContext, digest: Digest) -> Response:
    return Response(
        b"",
        status_code=201,
        headers={
            **API_VERSION,
            "Location": ctx.location(f"blobs/{digest}"),
            "Docker-Content-Digest": str(digest),
        },
    )


def _parse_digest(value: str | None) -> Digest:
    if not value:
        raise ApiError("DIGEST_INVALID", "the digest= query parameter is required")
    try:
        return Digest.parse(value)
    except FormatError as e:
        raise ApiError("DIGEST_INVALID", str(e)) from None
